"""Precompute SSR's SAM features once: `python -m ssr.uda.sam_cache experiment=<name> [out=DIR]`.

An opt-in deviation from docs/method.md §6.3, where SAM runs on every step's source and mixed
crops. Here every source image and every target-train image is encoded once, as the
training pipeline sees it before cropping: the keep-ratio resized, normalised full image (§4.1
steps 2 and 6). SAM's input is fixed (1024 px for vit_*, position embedding), so the full image
is encoded in crop-sized tiles, each stretched to SAM's input exactly as an online crop is
(512 -> 1024, so one token = 8 px of the resized image); tiles start on token boundaries and
overlapping tiles are blended with weights that favour each tile's centre. Training with
`uda.sam.cache_dir=DIR` then cuts each crop's features out of these maps
(`ssr.uda.sam_features.CachedSamFeatures`) and mixes source and target features with the
ClassMix mask.

Why a Hydra CLI on top of the train config: the cache is valid for exactly one combination of
SAM encoder, data resize and crop size; composing the same config as `ssr.train` (same
`experiment=`, same overrides) makes the cache match the run it is built for, and
`uda.sam.cache_dir` names the folder for both commands.

Resumable: a finished image is one `.npy` file written atomically (temporary file + rename), so
an interrupted run continues where it stopped; the manifest is marked complete only at the end.
Storage: float16 by default (`dtype=float32` for exact features).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssr import CONF_PATH
from ssr.data.datasets import FolderDataset
from ssr.data.files import read_image
from ssr.data.transforms import test_transform
from ssr.data.workers import worker_init
from ssr.io import atomic_write, atomic_write_json, remove_stale_temps_in
from ssr.run.cli import cli, resolve_device
from ssr.uda.sam_encoder import SamEncoder
from ssr.uda.sam_features import (
    CACHE_DOMAINS,
    CACHE_FORMAT,
    CACHE_MANIFEST,
    CACHE_VERSION,
    SamCacheError,
    cache_file,
    cache_map_size,
    cache_token_px,
)

log = logging.getLogger(__name__)

# The CLI's config: everything of the train config (so `experiment=` and every override work as
# for training) plus the few cache settings below.
ConfigStore.instance().store(
    name="sam_cache",
    node={
        "defaults": ["train", "_self_"],
        "task_name": "sam_cache",
        "out": None,  # null = uda.sam.cache_dir
        "dtype": "float16",  # storage: float16 halves the disk size, float32 stores SAM's output
        "stride": None,  # [h, w] tile stride in resized-image px; null = the crop size
        "domains": list(CACHE_DOMAINS),
        "device": "auto",
        "tiles_per_batch": 8,  # tiles per SAM call
    },
)

DTYPES = {"float16": np.float16, "float32": np.float32}


def tile_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts covering [0, length): every `stride` px, the last one flush with the end."""
    if length <= tile:
        return [0]
    origins = list(range(0, length - tile + 1, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def tile_weights(grid: Sequence[int]) -> Tensor:
    """(gh, gw) blending weights 1, 2, ..., 2, 1: a token counts most where it is central.

    Where tiles do not overlap the weights cancel out; where they do, the blend favours the tile
    whose context around that token is most like an online crop centred there.
    """
    axes = [torch.minimum(torch.arange(g) + 1, g - torch.arange(g)).float() for g in grid]
    return axes[0][:, None] * axes[1][None, :]


@torch.no_grad()
def encode_full(
    sam: SamEncoder,
    image: Tensor,
    crop_size: Sequence[int],
    stride: Sequence[int] | None = None,
    tiles_per_batch: int = 8,
) -> Tensor:
    """(C, Hf, Wf) SAM features of a whole (3, H, W) normalised image, tile by tile.

    Each tile is one crop-sized window (padded with 0 = the mean colour where the image ends, as
    the training pipeline pads) and goes through the encoder exactly like an online crop.
    """
    crop = (int(crop_size[0]), int(crop_size[1]))
    px = cache_token_px(crop, sam.grid)
    stride = crop if stride is None else (int(stride[0]), int(stride[1]))
    if any(s <= 0 or s % p or s > c for s, p, c in zip(stride, px, crop, strict=True)):
        raise SamCacheError(
            f"tile stride {list(stride)} must be positive multiples of the {px[0]}x{px[1]} px "
            f"token and at most the crop {list(crop)}"
        )
    height, width = image.shape[-2:]
    hf, wf = cache_map_size((height, width), crop, px)
    padded = F.pad(image, (0, wf * px[1] - width, 0, hf * px[0] - height))
    boxes = [
        (y, x)
        for y in tile_origins(hf * px[0], crop[0], stride[0])
        for x in tile_origins(wf * px[1], crop[1], stride[1])
    ]
    g = sam.grid
    weight = tile_weights((g, g)).to(image)
    acc = image.new_zeros(sam.dim, hf, wf)
    total = image.new_zeros(hf, wf)
    for i in range(0, len(boxes), tiles_per_batch):
        chunk = boxes[i : i + tiles_per_batch]
        tiles = torch.stack([padded[:, y : y + crop[0], x : x + crop[1]] for y, x in chunk])
        for (y, x), feat in zip(chunk, sam(tiles), strict=True):
            ty, tx = y // px[0], x // px[1]
            acc[:, ty : ty + g, tx : tx + g] += feat * weight
            total[ty : ty + g, tx : tx + g] += weight
    return acc / total


class FullImages(Dataset):
    """(index, (3, H, W) normalised image) at the training resize, before any crop or flip."""

    def __init__(self, dataset: FolderDataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Tensor]:
        index = self.indices[i]
        image = read_image(self.dataset.images[index])
        return index, self.dataset.make_item(index, image, None)["img"]


def _datasets(cfg: DictConfig, domains: Sequence[str]) -> dict[str, FolderDataset]:
    """The training images of each domain with the training resize (no crop, no flip)."""
    data, out = cfg.data, {}
    for domain in ("source", "target"):
        if domain in domains:
            out[domain] = FolderDataset(
                data[f"{domain}_root"],
                data[f"{domain}_format"],
                "train",
                test_transform(tuple(data[f"{domain}_resize"])),
                label=False,
            )
    return out


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(root / CACHE_MANIFEST, manifest)


def _start_manifest(root: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest to extend: the existing one if its settings match, else a new one."""
    path = root / CACHE_MANIFEST
    if not path.is_file():
        return {**settings, "domains": {}, "complete": False}
    old = json.loads(path.read_text())
    for key, value in settings.items():
        if old.get(key) != value:
            raise SamCacheError(
                f"{root} holds a SAM cache built with {key}={old.get(key)!r}, this run has "
                f"{value!r}: choose another out= or delete {root}"
            )
    return old


def build_cache(cfg: DictConfig) -> dict[str, Any]:
    """Encode every missing image of `cfg.domains`; returns per-domain counts and timings."""
    sam_cfg = cfg.uda.get("sam")
    if sam_cfg is None:
        raise SamCacheError(
            "this experiment has no SAM regulariser (uda.sam is null): use an SSR experiment "
            "(experiment=ssr, mic_ssr, demo_ssr, ...) or add uda/sam=vit_b"
        )
    out = cfg.out if cfg.out is not None else sam_cfg.get("cache_dir")
    if out is None:
        raise SamCacheError("no output folder: pass out=DIR or uda.sam.cache_dir=DIR")
    if cfg.dtype not in DTYPES:
        raise SamCacheError(f"dtype={cfg.dtype!r}; choose one of {sorted(DTYPES)}")
    unknown = sorted(set(cfg.domains) - set(CACHE_DOMAINS))
    if unknown:
        raise SamCacheError(f"domains {unknown} unknown; choose from {list(CACHE_DOMAINS)}")
    root, device = Path(out), resolve_device(cfg.device)
    datasets = _datasets(cfg, cfg.domains)  # a wrong data root fails before SAM is loaded
    sam: SamEncoder = instantiate(sam_cfg.encoder).to(device)
    crop = [int(c) for c in cfg.data.crop_size]
    px = cache_token_px(crop, sam.grid)
    stride = [int(s) for s in (cfg.stride if cfg.stride is not None else crop)]
    settings = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "variant": sam.variant,
        "checkpoint": sam.checkpoint,
        "fingerprint": sam.fingerprint(),
        "dim": sam.dim,
        "grid": sam.grid,
        "crop_size": crop,
        "token_px": list(px),
        "stride": stride,
        "dtype": cfg.dtype,
        **({"sam_bf16": True} if sam.bf16 else {}),  # features of SAM's bf16 speed mode
    }
    manifest = _start_manifest(root, settings)
    manifest["complete"] = False
    root.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out": str(root)}
    for domain, dataset in datasets.items():
        resize = [int(r) for r in cfg.data[f"{domain}_resize"]]
        previous = manifest["domains"].get(domain)
        if previous is not None and previous["resize"] != resize:
            raise SamCacheError(
                f"{root}/{domain} was built with resize {previous['resize']}, this run has "
                f"{resize}: choose another out= or delete {root}"
            )
        manifest["domains"][domain] = {
            "root": str(Path(dataset.root).resolve()),
            "resize": resize,
            "images": len(dataset),
            "complete": False,
        }
        _write_manifest(root, manifest)
        names = [p.relative_to(dataset.root).as_posix() for p in dataset.images]
        for folder in sorted({cache_file(root, domain, n).parent for n in names}):
            if folder.is_dir():
                remove_stale_temps_in(folder)  # left by an interrupted run
        todo = [i for i, n in enumerate(names) if not cache_file(root, domain, n).is_file()]
        start = time.perf_counter()
        loader = DataLoader(
            FullImages(dataset, todo),
            batch_size=None,
            num_workers=int(cfg.data.num_workers),
            worker_init_fn=worker_init(),
        )
        with _progress() as progress:
            task = progress.add_task(domain, total=len(names), completed=len(names) - len(todo))
            for index, image in loader:
                feats = encode_full(sam, image.to(device), crop, stride, cfg.tiles_per_batch)
                array = feats.cpu().numpy().astype(DTYPES[cfg.dtype])
                atomic_write(
                    cache_file(root, domain, names[index]),
                    lambda f, a=array: np.save(f, a),
                    durable=False,
                )
                progress.advance(task)
        seconds = time.perf_counter() - start
        manifest["domains"][domain]["complete"] = True
        _write_manifest(root, manifest)
        files = [cache_file(root, domain, n) for n in names]
        summary[domain] = {
            "images": len(names),
            "encoded": len(todo),
            "seconds": seconds,
            "bytes": sum(f.stat().st_size for f in files),
        }
    manifest["complete"] = all(
        manifest["domains"].get(d, {}).get("complete", False) for d in CACHE_DOMAINS
    )
    _write_manifest(root, manifest)
    summary["complete"] = manifest["complete"]
    return summary


def _progress() -> Progress:
    return Progress(
        TextColumn("SAM features {task.description:>6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


@hydra.main(config_path=CONF_PATH, config_name="sam_cache", version_base="1.3")
@cli
def main(cfg: DictConfig) -> None:
    summary = build_cache(cfg)
    table = Table(title=f"ssr.uda.sam_cache -> {summary['out']}", show_header=True)
    for col in ("domain", "images", "encoded now", "time", "size"):
        table.add_column(col)
    for domain in CACHE_DOMAINS:
        if domain in summary:
            s = summary[domain]
            table.add_row(
                domain,
                str(s["images"]),
                str(s["encoded"]),
                f"{s['seconds']:.1f} s",
                f"{s['bytes'] / 2**20:.1f} MiB",
            )
    Console().print(table)
    if not summary["complete"]:
        log.warning("the cache is not complete yet: run the other domain(s) before training")


if __name__ == "__main__":
    main()
