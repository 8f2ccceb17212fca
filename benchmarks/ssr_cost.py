"""What SSR costs (issue 4 evidence), measured side by side in one run; results in one JSON file.

Parts (each a function `part(args) -> dict`, stored under its key of the JSON file):
  fusion      (b) SSR's cross-attention fusion at the real stage sizes of a 512x512 crop (MiT-B5
              stage tokens 128^2, 64^2, 32^2, 16^2 query 64^2 projected SAM tokens; ALGORITHM.md
              §6.5, §6.10.6): fused `scaled_dot_product_attention` vs the reference's explicit
              softmax(QK^T * scale)V, forward + backward, peak memory and wall time.
  inference   (a) latency of the exported SSR student vs the exported DAFormer student: both
              trained one step from their experiments (`demo_ssr` / `demo_daformer`, or MiT-B5
              built randomly with --infer-model b5), exported with `ssr.export`, loaded with
              `ssr.eval.load_segmentor`, whole-image inference at the Cityscapes test scale,
              timed interleaved (alternating order), median of --infer-reps. Expected ratio 1.00:
              the shipped network is the same (§6.1), which the part also checks key by key.
  train_step  (c) one training step of `ssr`/`daformer` and `mic_ssr`/`mic` (tiny model, tiny
              SAM, the demo experiments on a synthetic dataset built in a temporary folder),
              SAM online vs SAM from the cache of `ssr.sam_cache`; variants timed round-robin.
              Also: SAM's share of the step (online encode vs cache read + mix), what the cache
              changes (cached vs online features: relative error and cosine similarity), the
              cache's build time, and its disk size/SAM calls at paper scale (vit_b, GTA5 and
              Cityscapes), computed from the cache geometry.

Run: python benchmarks/ssr_cost.py --device cpu [--parts fusion inference train_step] [--threads 1]
     (--threads 1 on a shared CPU: with 2 threads under load, every intra-op barrier waits for a
     descheduled thread and latencies swing 5-10x)
     python benchmarks/ssr_cost.py --markdown   (print the README tables of the JSON file only)
An existing output file is updated: only the parts run now are replaced, per device
(JSON: {part: {device: result}}). A Markdown summary for the README is printed at the end.

Memory, CUDA: torch.cuda.max_memory_allocated above what was allocated before the forward.
Memory, CPU: the same quantity from the profiler's allocation trace (every CPU allocation and
free with the running total), since torch keeps no CPU allocator statistics. `saved_bytes` is the
size of the tensors autograd keeps for backward (unique storages, inputs and weights excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from peak_memory import peak_bytes, sync
from segment_anything import sam_model_registry
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from ssr import CONF_DIR
from ssr.data import prepare, synthetic
from ssr.data.datasets import read_image
from ssr.data.labels import MEAN, STD
from ssr.data.transforms import rescale_size, test_transform
from ssr.eval import load_segmentor
from ssr.export import export
from ssr.model.mit import MIT_VARIANTS
from ssr.sam_cache import build_cache, tile_origins
from ssr.train import build_module
from ssr.uda.module import UDAModule
from ssr.uda.sam import (
    ATTENTION_MODES,
    CrossAttentionFusion,
    cache_file,
    cache_map_size,
    crop_features,
)

MIT_STRIDES = (4, 8, 16, 32)  # stage output strides of MiT (§1.2)


def sam_grid(variant: str = "vit_b") -> int:
    """Side of SAM's token grid (64 for every released SAM), read from the model, not restated."""
    with torch.device("meta"):
        return sam_model_registry[variant](checkpoint=None).image_encoder.pos_embed.shape[1]


class FusionCase:
    """One stage's fusion layer with inputs that require grad, as in training."""

    def __init__(self, side: int, dim: int, heads: int, keys: int, batch: int, device, dtype):
        gen = torch.Generator().manual_seed(side)
        self.layer = CrossAttentionFusion(dim, heads).to(device, dtype)
        self.x = torch.randn(batch, side * side, dim, generator=gen).to(device, dtype)  # queries
        self.ctx = torch.randn(batch, keys, dim, generator=gen).to(device, dtype)  # SAM tokens
        self.grad = torch.randn(batch, side * side, dim, generator=gen).to(device, dtype)
        self.x.requires_grad_()  # backbone features
        self.ctx.requires_grad_()  # output of the trained projection
        self.inputs = [self.x, self.ctx, *self.layer.parameters()]

    def forward(self, attention: str) -> torch.Tensor:
        self.layer.attention = attention
        return self.layer(self.x, self.ctx)

    def zero_grad(self) -> None:
        for t in self.inputs:
            t.grad = None


def _run(cases: Sequence[FusionCase], attention: str) -> None:
    """Forward of every case into one graph, then one backward (how a training step uses them)."""
    outs = [c.forward(attention) for c in cases]
    torch.autograd.backward(outs, [c.grad for c in cases])


def _run_counting_saved(cases: Sequence[FusionCase], attention: str) -> int:
    """`_run`, returning the bytes autograd saved for backward (once per storage, no inputs)."""
    skip = {t.untyped_storage().data_ptr() for c in cases for t in c.inputs}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(cases, attention)
    return sum(storages.values())


def _measure(cases: Sequence[FusionCase], device, reps: int, warmup: int) -> dict[str, dict]:
    """Both attention modes, timed runs interleaved so that load changes hit both alike.

    `cpu_time_ms` (process CPU time, all threads) is less sensitive than wall time to other
    processes sharing the CPU.
    """
    wall: dict[str, list[float]] = {m: [] for m in ATTENTION_MODES}
    cpu: dict[str, list[float]] = {m: [] for m in ATTENTION_MODES}
    for i in range(warmup + reps):
        for mode in ATTENTION_MODES:
            for c in cases:
                c.zero_grad()
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _run(cases, mode)
            sync(device)
            if i >= warmup:
                wall[mode].append(1e3 * (time.perf_counter() - start))
                cpu[mode].append(1e3 * (time.process_time() - start_cpu))
    out = {}
    for mode in ATTENTION_MODES:
        for c in cases:
            c.zero_grad()
        peak, saved = peak_bytes(device, lambda mode=mode: _run_counting_saved(cases, mode))
        for c in cases:
            c.zero_grad()
        out[mode] = {
            "time_ms": statistics.median(wall[mode]) if wall[mode] else None,
            "cpu_time_ms": statistics.median(cpu[mode]) if cpu[mode] else None,
            "times_ms": [round(t, 2) for t in wall[mode]],
            "peak_bytes": peak,
            "saved_bytes": saved,
        }
    return out


def _ratios(res: dict[str, dict]) -> dict[str, float | None]:
    """explicit / sdpa: > 1 means the fused kernel is better."""
    sdpa, ref = res["sdpa"], res["explicit"]

    def ratio(key: str) -> float | None:
        return round(ref[key] / sdpa[key], 3) if ref[key] and sdpa[key] else None

    return {
        "memory_ratio": ratio("peak_bytes"),
        "saved_ratio": ratio("saved_bytes"),
        "time_ratio": ratio("time_ms"),
        "cpu_time_ratio": ratio("cpu_time_ms"),
    }


def fusion_part(args: argparse.Namespace) -> dict[str, Any]:
    """(b): each stage alone (time, memory), then all selected stages in one graph (memory)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = MIT_VARIANTS[args.mit]
    keys = sam_grid(args.sam) ** 2
    cases = {}
    for i in args.stages:
        side, dim, heads = args.crop // MIT_STRIDES[i], spec.embed_dims[i], spec.num_heads[i]
        cases[i] = FusionCase(side, dim, heads, keys, args.batch, device, dtype)
    stages = []
    for i, case in cases.items():
        with torch.no_grad():
            diff = (case.forward("sdpa") - case.forward("explicit")).abs().max().item()
        row: dict[str, Any] = {
            "stage": i,
            "queries": case.x.shape[1],
            "keys": keys,
            "channels": case.x.shape[2],
            "heads": case.layer.num_heads,
            "max_abs_diff": diff,
        }
        row |= _measure([case], device, args.reps, args.warmup)
        for mode in ATTENTION_MODES:
            print(f"stage {i} {mode:8s} {_fmt(row[mode])}", flush=True)
        row |= _ratios(row)
        stages.append(row)
    # All stages in one graph: their saved tensors coexist until the backward (memory only).
    together: dict[str, Any] = {"stages": list(cases)}
    together |= _measure(list(cases.values()), device, reps=0, warmup=0)
    for mode in ATTENTION_MODES:
        print(f"stages {list(cases)} {mode:8s} {_fmt(together[mode])}", flush=True)
    together |= _ratios(together)
    return {
        "what": "CrossAttentionFusion forward+backward, sdpa vs explicit softmax (ALGORITHM §6.5)",
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "batch": args.batch,
        "crop": args.crop,
        "mit": args.mit,
        "sam": args.sam,
        "reps": args.reps,
        "warmup": args.warmup,
        "memory": "peak bytes allocated above the pre-forward level (CUDA allocator, CPU profiler)",
        "ratios": "explicit / sdpa",
        "per_stage": stages,
        "all_stages": together,
    }


def _fmt(r: dict[str, Any]) -> str:
    t = f"{r['time_ms']:8.0f} ms (cpu {r['cpu_time_ms']:8.0f})" if r["time_ms"] is not None else ""
    t = f"{t:27s}"
    return (
        f"{t}  peak {r['peak_bytes'] / 2**20:8.1f} MiB  saved {r['saved_bytes'] / 2**20:8.1f} MiB"
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------ shared helpers
def _compose(config: str, overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(config, overrides=list(overrides))


def _build_module(cfg: DictConfig) -> UDAModule:
    """The UDA module of a composed train config, from a fixed torch seed (same init each time)."""
    torch.manual_seed(0)
    return build_module(cfg)


class StepTimer(pl.Callback):
    """Wall and process-CPU time of every training step (optimizer step included)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.wall.append(1e3 * (time.perf_counter() - self._start[0]))
        self.cpu.append(1e3 * (time.process_time() - self._start[1]))


def _fit(
    module: UDAModule, batches: Sequence[dict], callbacks: Sequence[pl.Callback] = ()
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, DataLoader(list(batches), batch_size=None))
    return trainer


def _random_batches(n: int, batch: int = 2, size: int = 64) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "src_img": torch.randn(batch, 3, size, size, generator=gen),
            "src_lbl": torch.randint(0, 19, (batch, size, size), generator=gen),
            "tgt_img": torch.randn(batch, 3, size, size, generator=gen),
        }
        for _ in range(n)
    ]


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# ------------------------------------------------------------------------- (a) inference
def inference_part(args: argparse.Namespace) -> dict[str, Any]:
    """(a): exported SSR student vs exported DAFormer student, same input, interleaved timing."""
    device = torch.device(args.device)
    model = [] if args.infer_model == "tiny" else [f"model=daformer_mit{args.infer_model}"]
    model += ["model.backbone.pretrained=null"] if model else []
    experiments = {"daformer": "demo_daformer", "ssr": "demo_ssr"}
    segmentors, files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, experiment in experiments.items():
            cfg = _compose("train", [f"experiment={experiment}", *model])
            trainer = _fit(_build_module(cfg), _random_batches(1))
            ckpt, out = Path(tmp) / f"{name}.ckpt", Path(tmp) / f"{name}.pt"
            trainer.save_checkpoint(ckpt)
            stats = export(ckpt, out, cfg.model)
            segmentors[name], _, fmt = load_segmentor(out, cfg.model, device)
            assert fmt == "export", fmt
            files[name] = {"params": stats["params"], "bytes": stats["bytes"]}
    shapes = {
        n: {k: tuple(v.shape) for k, v in s.state_dict().items()} for n, s in segmentors.items()
    }
    same = list(shapes["ssr"].items()) == list(shapes["daformer"].items())
    height, width = args.infer_size
    img = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    flops = {}
    for name, segmentor in segmentors.items():  # the deterministic half of the evidence
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            segmentor.inference(img, mode="whole", out_size=(2 * height, 2 * width))
        flops[name] = counter.get_total_flops()
    wall: dict[str, list[float]] = {n: [] for n in segmentors}
    cpu: dict[str, list[float]] = {n: [] for n in segmentors}
    names = list(segmentors)
    with torch.inference_mode():
        for i in range(args.infer_warmup + args.infer_reps):
            for name in names if i % 2 == 0 else names[::-1]:  # alternate who goes first
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                segmentors[name].inference(img, mode="whole", out_size=(2 * height, 2 * width))
                sync(device)
                if i >= args.infer_warmup:
                    wall[name].append(1e3 * (time.perf_counter() - start))
                    cpu[name].append(1e3 * (time.process_time() - start_cpu))
    result: dict[str, Any] = {
        "what": "exported student inference latency, SSR / DAFormer (whole image, §3.2)",
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.infer_model,
        "input": [height, width],
        "output": [2 * height, 2 * width],
        "reps": args.infer_reps,
        "warmup": args.infer_warmup,
        "identical_keys_and_shapes": same,
        "files": files,
        "gflops": {n: round(f / 1e9, 3) for n, f in flops.items()},
        "time_ratio_is": "median over rounds of ssr/daformer, each round timing both back to back",
    }
    for name in names:
        result[name] = {
            "time_ms": _median(wall[name]),
            "cpu_time_ms": _median(cpu[name]),
            "times_ms": [round(t, 2) for t in wall[name]],
        }
        print(f"inference {name:8s} {result[name]['time_ms']:8.1f} ms", flush=True)
    # Paired per-round ratios: both networks timed back to back under the same load; their
    # median is robust to the load changes of a shared machine, unlike a ratio of medians.
    paired = [a / b for a, b in zip(wall["ssr"], wall["daformer"], strict=True)]
    paired_cpu = [a / b for a, b in zip(cpu["ssr"], cpu["daformer"], strict=True)]
    result["time_ratio"] = _median(paired)
    result["time_ratio_iqr"] = [round(float(q), 3) for q in np.percentile(paired, [25, 75])]
    result["cpu_time_ratio"] = _median(paired_cpu)
    result["ratio_of_medians"] = round(result["ssr"]["time_ms"] / result["daformer"]["time_ms"], 3)
    result["ratio_of_minima"] = round(min(wall["ssr"]) / min(wall["daformer"]), 3)
    return result


# ------------------------------------------------------------------------ (c) training step
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
        student = instantiate(_compose("train", ["model.backbone.pretrained=null"]).model)
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


def _synthetic_data(root: Path) -> None:
    synthetic.generate(root, num_source=8, num_target_train=4, num_target_val=2)
    for name, folder in (("gta5", "gta"), ("cityscapes", "cityscapes")):
        if prepare.main([name, str(root / folder), "--nproc", "1"]) != 0:
            raise RuntimeError(f"preparing the synthetic {name} data in {root} failed")


def _cache_fidelity(cfg: DictConfig, datamodule: Any, samples: int) -> dict[str, Any]:
    """Cached vs online SAM features of the same crops (what the cache changes).

    Online = `SamRegularizer.encode` of the crop the student sees; cached = `crop_features` of the
    full-image map. Split by whether the crop offset is a multiple of the token size (exact cut)
    or not (bilinear between tokens; 'snap' = rounding to the nearest token instead). Reference
    points: online features of two crops one token apart (on their common tokens) and of two
    unrelated crops.
    """
    sam = instantiate(cfg.uda.sam, data_mean=list(MEAN), data_std=list(STD))
    cache = sam.cache
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
            _, _, top, left, flip = item[f"{prefix}_crop"].tolist()
            online = sam.encode(item[f"{prefix}_img"][None])[0]
            full = np.load(cache_file(cache.root, domain, item[f"{prefix}_file"]))
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
        a = sam.encode(image[None, :, : crop[0], : crop[1]])[0]
        b = sam.encode(image[None, :, : crop[0], px[1] : px[1] + crop[1]])[0]
        compare("online, crop moved by 1 token (common tokens)", b[..., :-1], a[..., 1:])
        c = sam.encode(image[None, :, -crop[0] :, -crop[1] :])[0]
        compare("online, two different crops", c, a)
    return {
        key: {
            "n": len(v),
            "rel_error": float(f"{np.mean([r for r, _ in v]):.4g}"),
            "cosine": round(float(np.mean([c for _, c in v])), 4),
        }
        for key, v in rows.items()
    }


def train_step_part(args: argparse.Namespace) -> dict[str, Any]:
    """(c): step times of the four methods, SSR online vs cached; what the cache saves/changes."""
    if args.device != "cpu":
        print("train_step runs the tiny CPU demo setting; --device is ignored for it", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _synthetic_data(root / "data")
        data = [
            f"data.source_root={root / 'data' / 'gta'}",
            f"data.target_root={root / 'data' / 'cityscapes'}",
            "data.num_workers=0",
            "data.rcs.min_pixels=10",
            f"data.batch_size={args.step_batch}",
        ]
        cache_dir = root / "sam_cache"
        # ssr.sam_cache's own config (train.yaml + its keys), as `python -m ssr.sam_cache` runs it
        cache_cfg = _compose(
            "sam_cache", ["experiment=demo_ssr", *data, f"uda.sam.cache_dir={cache_dir}"]
        )
        build = build_cache(cache_cfg)
        datamodule = instantiate(cache_cfg.data, crop_info=True, seed=0)
        datamodule.setup("fit")
        datamodule.train_set.crop_info = True
        batches = list(
            DataLoader(
                datamodule.train_set,
                batch_size=datamodule.batch_size,
                sampler=range(datamodule.batch_size * args.steps),
            )
        )
        variants = {
            "daformer": ["experiment=demo_daformer"],
            "ssr (SAM online)": ["experiment=demo_ssr"],
            "ssr (SAM cached)": ["experiment=demo_ssr", f"uda.sam.cache_dir={cache_dir}"],
            "mic": ["experiment=demo_mic"],
            "mic_ssr (SAM online)": ["experiment=demo_mic_ssr"],
            "mic_ssr (SAM cached)": ["experiment=demo_mic_ssr", f"uda.sam.cache_dir={cache_dir}"],
        }
        cfgs = {n: _compose("train", [*o, *data]) for n, o in variants.items()}
        timers = {n: StepTimer() for n in variants}
        for _ in range(args.rounds):  # round-robin: load changes hit every variant alike
            for name, cfg in cfgs.items():
                timer = StepTimer()
                _fit(_build_module(cfg), batches, [timer])
                timers[name].wall += timer.wall[args.step_warmup :]
                timers[name].cpu += timer.cpu[args.step_warmup :]
        sam_cost = _sam_cost(cfgs, batches, args.rounds * args.steps)
        fidelity = _cache_fidelity(cfgs["ssr (SAM cached)"], datamodule, args.fidelity_samples)
    steps = {
        name: {"time_ms": _median(t.wall), "cpu_time_ms": _median(t.cpu), "n": len(t.wall)}
        for name, t in timers.items()
    }
    for name, r in steps.items():
        print(f"train step {name:22s} {r['time_ms']:8.1f} ms (cpu {r['cpu_time_ms']:8.1f})")

    def ratio(a: str, b: str) -> float:
        return round(steps[a]["time_ms"] / steps[b]["time_ms"], 3)

    cfg0 = cfgs["ssr (SAM online)"]
    return {
        "what": "one UDA training step (tiny MiT, tiny SAM, demo experiments, synthetic data)",
        "device": _device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": int(cfg0.data.batch_size),
        "crop": list(cfg0.data.crop_size),
        "sam": {
            "variant": cfg0.uda.sam.variant,
            "input": int(cfg0.uda.sam.get("input_size") or 128),
        },
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "warmup_steps_per_round": args.step_warmup,
        "steps": steps,
        "ratios": {
            "ssr / daformer (online)": ratio("ssr (SAM online)", "daformer"),
            "ssr / daformer (cached)": ratio("ssr (SAM cached)", "daformer"),
            "mic_ssr / mic (online)": ratio("mic_ssr (SAM online)", "mic"),
            "mic_ssr / mic (cached)": ratio("mic_ssr (SAM cached)", "mic"),
            "ssr cached / online": ratio("ssr (SAM cached)", "ssr (SAM online)"),
            "mic_ssr cached / online": ratio("mic_ssr (SAM cached)", "mic_ssr (SAM online)"),
        },
        "sam_features_ms": sam_cost,
        "cache_build": {
            d: {"images": v["images"], "seconds": round(v["seconds"], 2), "bytes": v["bytes"]}
            for d, v in build.items()
            if isinstance(v, dict)
        },
        "cache_vs_online": fidelity,
        "paper_scale_vit_b": paper_scale_estimate(),
    }


def _sam_cost(cfgs: dict[str, DictConfig], batches: Sequence[dict], reps: int) -> dict[str, Any]:
    """Time of `SamRegularizer.step_features` alone: SAM online vs cache read + mask mix."""
    online = _build_module(cfgs["ssr (SAM online)"]).sam
    cached = _build_module(cfgs["ssr (SAM cached)"]).sam
    gen = np.random.default_rng(0)
    wall: dict[str, list[float]] = {"online": [], "cached": []}
    for i in range(reps + 1):
        batch = batches[i % len(batches)]
        xs, xt = batch["src_img"], batch["tgt_img"]
        mask = torch.from_numpy(gen.random((xs.shape[0], 1, *xs.shape[2:])) < 0.5).float()
        xm = mask * xs + (1 - mask) * xt
        for name, sam in (("online", online), ("cached", cached)):
            start = time.perf_counter()
            sam.step_features(xs, xm, mask, batch)
            if i:  # the first round warms up
                wall[name].append(1e3 * (time.perf_counter() - start))
    return {k: _median(v) for k, v in wall.items()} | {"n": reps}


PARTS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "fusion": fusion_part,
    "inference": inference_part,
    "train_step": train_step_part,
}


# ------------------------------------------------------------------------- README summary
def markdown(results: dict[str, Any]) -> str:
    """The README tables of every part and device in `results`."""
    lines: list[str] = []
    for r in results.get("inference", {}).values():
        lines += [
            f"**(a) Inference, exported student** ({r['device']}, MiT {r['model']}, "
            f"{r['input'][0]}x{r['input'][1]} input, median of {r['reps']}, interleaved)",
            "",
            "| model | latency (ms) | CPU time (ms) | parameters |",
            "|---|---:|---:|---:|",
        ]
        for name in ("daformer", "ssr"):
            lines.append(
                f"| {name} | {r[name]['time_ms']:.1f} | {r[name]['cpu_time_ms']:.1f} | "
                f"{r['files'][name]['params']:,} |"
            )
        iqr = r["time_ratio_iqr"]
        lines += [
            f"| **ssr / daformer** | **{r['time_ratio']:.3f}** (IQR {iqr[0]:.3f}-{iqr[1]:.3f}) | "
            f"{r['cpu_time_ratio']:.3f} | identical keys and shapes: "
            f"{r['identical_keys_and_shapes']} |",
            "",
            f"GFLOPs per image: daformer {r['gflops']['daformer']}, ssr {r['gflops']['ssr']}; "
            f"ratio of medians {r['ratio_of_medians']:.3f}, of minima {r['ratio_of_minima']:.3f} "
            f"({r['threads']} thread(s)).",
            "",
        ]
    for r in results.get("fusion", {}).values():
        lines += [
            f"**(b) Fusion, SDPA vs explicit attention** ({r['device']}, {r['dtype']}, batch "
            f"{r['batch']}, {r['crop']}² crop, forward + backward)",
            "",
            "| stage | queries x keys | explicit / sdpa memory | explicit / sdpa time |",
            "|---|---|---:|---:|",
        ]
        for s in r["per_stage"]:
            lines.append(
                f"| {s['stage']} | {s['queries']} x {s['keys']} | {s['memory_ratio']} | "
                f"{s['time_ratio']} |"
            )
        a = r["all_stages"]
        lines += [f"| all {a['stages']} | one graph | {a['memory_ratio']} | — |", ""]
    for r in results.get("train_step", {}).values():
        lines += [
            f"**(c) One training step** ({r['device']}, tiny MiT + tiny SAM, batch {r['batch']}, "
            f"{r['crop'][0]}x{r['crop'][1]} crops, median of {r['steps']['daformer']['n']})",
            "",
            "| method | step (ms) | vs. its baseline |",
            "|---|---:|---:|",
        ]
        base = {"ssr": "daformer", "mic_ssr": "mic"}
        for name, s in r["steps"].items():
            method = name.split(" ")[0]
            rel = (
                f"{s['time_ms'] / r['steps'][base[method]]['time_ms']:.2f}x"
                if method in base
                else "1.00x"
            )
            lines.append(f"| {name} | {s['time_ms']:.1f} | {rel} |")
        sam = r["sam_features_ms"]
        lines += [
            "",
            f"SAM features per step: online {sam['online']:.1f} ms, cached {sam['cached']:.1f} ms "
            "(read + crop + ClassMix blend).",
            "",
            "| cached vs online SAM features (tiny SAM) | n | rel. error | cosine |",
            "|---|---:|---:|---:|",
        ]
        for key, v in r["cache_vs_online"].items():
            lines.append(f"| {key} | {v['n']} | {v['rel_error']:.2g} | {v['cosine']:.3f} |")
        est = r["paper_scale_vit_b"]
        src, tgt = (v for k, v in est.items() if isinstance(v, dict))
        lines += [
            "",
            f"Paper scale (vit_b, {est['dim']}-d tokens of {est['token_px']} px, fp16): "
            f"{src['MiB_per_image_fp16']} MiB per GTA5 image ({src['tokens'][0]}x"
            f"{src['tokens'][1]} tokens), {tgt['MiB_per_image_fp16']} MiB per Cityscapes image; "
            f"{est['GiB_total_fp16']} GiB in all; building it runs SAM on "
            f"{est['sam_tiles_to_build']:,} tiles vs {est['sam_crops_per_40k_run_online']:,} "
            "crops online in one 40k-step run. Online SAM costs "
            f"{est['online_sam_tflops_per_step']} TFLOPs per step (forward, 4 crops at 1024²) = "
            f"{est['online_sam_per_step_in_student_crop_forwards']} MiT-B5 + DAFormer forwards "
            "of a 512² crop; the cache replaces it with reading 4 crop windows.",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/ssr_cost.json"))
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], choices=range(4))
    p.add_argument("--batch", type=int, default=2, help="images per branch pass (SSR: 2)")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--mit", default="b5", choices=sorted(MIT_VARIANTS))
    p.add_argument("--sam", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=None, help="timed runs (default: cpu 2, cuda 10)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--infer-model", default="tiny", choices=["tiny", *sorted(MIT_VARIANTS)])
    p.add_argument("--infer-size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    p.add_argument("--infer-reps", type=int, default=150)
    p.add_argument("--infer-warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="(c) round-robin rounds")
    p.add_argument("--steps", type=int, default=5, help="(c) training steps per fit")
    p.add_argument("--step-batch", type=int, default=2, help="(c) batch (SSR configs: 2)")
    p.add_argument("--step-warmup", type=int, default=1, help="(c) untimed steps per fit")
    p.add_argument("--fidelity-samples", type=int, default=24, help="(c) training samples")
    p.add_argument("--markdown", action="store_true", help="only print the README tables")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is far steadier on a shared machine",
    )
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    args.reps = args.reps if args.reps is not None else (2 if args.device == "cpu" else 10)
    args.stages = sorted(set(args.stages))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.parts:
        results.setdefault(name, {})[args.device] = PARTS[name](args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
