"""(d) The opt-in SAM feature cache (`python -m ssr.uda.sam_cache`): what it changes and costs.

Reported inside part (c) of the JSON file: how far cached features are from online ones
(`cache_fidelity`) and the cache's disk size / SAM calls at paper scale (`paper_scale_estimate`),
computed from the cache geometry (docs/method.md §6.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from segment_anything import sam_model_registry
from torch.utils.flop_counter import FlopCounterMode

from ssr.data.datamodule import UDADataModule
from ssr.data.files import read_image
from ssr.data.scaling import rescale_size
from ssr.data.transforms import test_transform
from ssr.uda.sam_cache import tile_origins
from ssr.uda.sam_encoder import SamEncoder
from ssr.uda.sam_features import CachedSamFeatures, cache_file, cache_map_size, crop_features

from .common import compose_cfg

# Dataset sizes for the paper-scale cache estimate: GTA5 (all frames) and Cityscapes train.
GTA5_IMAGES, GTA5_SIZE = 24966, (1052, 1914)  # (H, W) of the standard frame (§4.1)
CITYSCAPES_TRAIN_IMAGES, CITYSCAPES_SIZE = 2975, (1024, 2048)


def _forward_flops(module: torch.nn.Module, shape: Sequence[int]) -> int:
    """FLOPs of one no-grad forward, counted on the meta device (no memory, no time)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(torch.empty(*shape, device="meta"))
    return counter.get_total_flops()


def paper_scale_estimate(variant: str = "vit_b", crop: int = 512) -> dict[str, Any]:
    """What the cache stores and saves for the released setting, from the models' geometry.

    Disk size and SAM calls of a full cache (token grid, feature size and input read from the
    segment-anything model built on the meta device), and the compute that online SAM costs per
    step (4 crops at SAM's input, §6.3) next to one MiT-B5 + DAFormer forward of a 512x512 crop.
    """
    with torch.device("meta"):
        encoder = sam_model_registry[variant](checkpoint=None).image_encoder
        student = instantiate(compose_cfg("train", ["model.backbone.pretrained=null"]).model)
    grid, dim, size = encoder.pos_embed.shape[1], encoder.neck[0].out_channels, encoder.img_size
    px = (crop // grid, crop // grid)
    out: dict[str, Any] = {"sam": variant, "token_px": px[0], "dim": dim, "tile_stride": crop}
    domains = {
        "source (GTA5 -> 1280x704)": (GTA5_IMAGES, rescale_size(*GTA5_SIZE, (1280, 720))),
        "target (Cityscapes train -> 1024x512)": (
            CITYSCAPES_TRAIN_IMAGES,
            rescale_size(*CITYSCAPES_SIZE, (1024, 512)),
        ),
    }
    total_bytes, total_calls = 0, 0
    for name, (count, image_size) in domains.items():
        hf, wf = cache_map_size(image_size, (crop, crop), px)
        tiles = len(tile_origins(hf * px[0], crop, crop)) * len(
            tile_origins(wf * px[1], crop, crop)
        )
        per_image = dim * hf * wf * 2  # float16
        out[name] = {
            "images": count,
            "resized": list(image_size),
            "tokens": [hf, wf],
            "MiB_per_image_fp16": round(per_image / 2**20, 3),
            "GiB_total_fp16": round(count * per_image / 2**30, 1),
            "sam_tiles_per_image": tiles,
        }
        total_bytes += count * per_image
        total_calls += count * tiles
    out["MiB_per_crop_map_fp16"] = round(dim * grid * grid * 2 / 2**20, 3)
    out["GiB_total_fp16"] = round(total_bytes / 2**30, 1)
    out["sam_tiles_to_build"] = total_calls
    out["sam_crops_per_40k_run_online"] = 40000 * 4  # 2 source + 2 mixed crops per step (§6.3)
    sam_step = _forward_flops(encoder, (4, 3, size, size))
    student_crop = _forward_flops(student, (1, 3, crop, crop))
    out["online_sam_tflops_per_step"] = round(sam_step / 1e12, 3)
    out["mitb5_daformer_tflops_per_crop_forward"] = round(student_crop / 1e12, 3)
    out["online_sam_per_step_in_student_crop_forwards"] = round(sam_step / student_crop, 1)
    return out


def cache_fidelity(cfg: DictConfig, datamodule: UDADataModule, samples: int) -> dict[str, Any]:
    """Cached vs online SAM features of the same crops (what the cache changes).

    Online = the `SamEncoder` applied to the crop the student sees; cached = `crop_features` of
    the full-image map. Split by whether the crop offset is a multiple of the token size (exact
    cut) or not (bilinear between tokens; 'snap' = rounding to the nearest token instead).
    Reference points: online features of two crops one token apart (on their common tokens) and
    of two unrelated crops.
    """
    encoder: SamEncoder = instantiate(cfg.uda.sam.encoder)
    cache = CachedSamFeatures(cfg.uda.sam.cache_dir, encoder)
    px, grid = cache.token_px, cache.grid
    rows: dict[str, list[tuple[float, float]]] = {}

    def compare(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        rel = ((a - b).norm() / b.norm()).item()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).mean().item()
        rows.setdefault(key, []).append((rel, cos))

    train_set = datamodule.train_set
    for i in range(samples):
        item = train_set[i]
        for domain, prefix in (("source", "src"), ("target", "tgt")):
            record = item[f"{prefix}_crop"]
            _, _, top, left, flip = record.box.tolist()
            online = encoder(item[f"{prefix}_img"][None])[0]
            full = np.load(cache_file(cache.root, domain, record.file))
            cached = crop_features(full, top, left, bool(flip), grid, px)
            aligned = top % px[0] == 0 and left % px[1] == 0
            compare(
                "aligned offset (exact cut)" if aligned else "other offset (bilinear)",
                cached,
                online,
            )
            if not aligned:
                snapped = crop_features(
                    full,
                    px[0] * round(top / px[0]),
                    px[1] * round(left / px[1]),
                    bool(flip),
                    grid,
                    px,
                )
                compare("other offset (snap to token)", snapped, online)
            compare("fp16 storage rounding alone", online.half().float(), online)
    source = train_set.source
    crop = cache.crop_size
    for k in range(min(len(source), 8)):
        image = source.make_item(
            k, read_image(source.images[k]), None, test_transform(tuple(cfg.data.source_resize))
        )["img"]
        a = encoder(image[None, :, : crop[0], : crop[1]])[0]
        b = encoder(image[None, :, : crop[0], px[1] : px[1] + crop[1]])[0]
        compare("online, crop moved by 1 token (common tokens)", b[..., :-1], a[..., 1:])
        c = encoder(image[None, :, -crop[0] :, -crop[1] :])[0]
        compare("online, two different crops", c, a)
    return {
        key: {
            "n": len(v),
            "rel_error": float(f"{np.mean([r for r, _ in v]):.4g}"),
            "cosine": round(float(np.mean([c for _, c in v])), 4),
        }
        for key, v in rows.items()
    }
