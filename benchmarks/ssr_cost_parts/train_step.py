"""(c) One UDA training step of `ssr`/`daformer` and `mic_ssr`/`mic`, SAM online vs cached.

Tiny model, tiny SAM, the demo experiments on a synthetic dataset built in a temporary folder;
SAM online vs SAM from the cache of `ssr.uda.sam_cache`; variants timed round-robin. Also: SAM's
share of the step (online encode vs cache read + mix), and the cache's build time, fidelity and
paper-scale size (part (d), `cache.py`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ssr.data import prepare, synthetic
from ssr.uda.mixing import MixedBatch
from ssr.uda.sam_cache import build_cache

from .cache import cache_fidelity, paper_scale_estimate
from .common import (
    StepTimer,
    compose_cfg,
    device_name,
    fit,
    median,
    seeded_module,
)


def _synthetic_data(root: Path) -> None:
    synthetic.generate(root, num_source=8, num_target_train=4, num_target_val=2)
    for name, folder in (("gta5", "gta"), ("cityscapes", "cityscapes")):
        if prepare.main([name, str(root / folder), "--nproc", "1"]) != 0:
            raise RuntimeError(f"preparing the synthetic {name} data in {root} failed")


def _sam_cost(cfgs: dict[str, DictConfig], batches: Sequence[dict], reps: int) -> dict[str, Any]:
    """Time of `SSRRegularizer.step_features` alone: SAM online vs cache read + mask mix."""
    online = seeded_module(cfgs["ssr (SAM online)"]).sam
    cached = seeded_module(cfgs["ssr (SAM cached)"]).sam
    gen = np.random.default_rng(0)
    wall: dict[str, list[float]] = {"online": [], "cached": []}
    for i in range(reps + 1):
        batch = batches[i % len(batches)]
        xs, xt = batch["src_img"], batch["tgt_img"]
        mask = torch.from_numpy(gen.random((xs.shape[0], 1, *xs.shape[2:])) < 0.5).float()
        # Label and weight do not enter the SAM features; only the image and the mask do.
        mixed = MixedBatch(
            mask * xs + (1 - mask) * xt, batch["src_lbl"], torch.ones(mask[:, 0].shape), mask
        )
        for name, sam in (("online", online), ("cached", cached)):
            start = time.perf_counter()
            sam.step_features(xs, mixed, batch["src_crop"], batch["tgt_crop"])
            if i:  # the first round warms up
                wall[name].append(1e3 * (time.perf_counter() - start))
    return {k: median(v) for k, v in wall.items()} | {"n": reps}


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
        # ssr.uda.sam_cache's own config (train + its keys), as `python -m ssr.uda.sam_cache` runs
        cache_cfg = compose_cfg(
            "sam_cache", ["experiment=demo_ssr", *data, f"uda.sam.cache_dir={cache_dir}"]
        )
        build = build_cache(cache_cfg)
        datamodule = instantiate(cache_cfg.data, seed=0)
        datamodule.setup("fit")
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
        cfgs = {n: compose_cfg("train", [*o, *data]) for n, o in variants.items()}
        timers = {n: StepTimer() for n in variants}
        for _ in range(args.rounds):  # round-robin: load changes hit every variant alike
            for name, cfg in cfgs.items():
                timer = StepTimer()
                fit(seeded_module(cfg), batches, [timer])
                timers[name].wall += timer.wall[args.step_warmup :]
                timers[name].cpu += timer.cpu[args.step_warmup :]
        sam_cost = _sam_cost(cfgs, batches, args.rounds * args.steps)
        fidelity = cache_fidelity(cfgs["ssr (SAM cached)"], datamodule, args.fidelity_samples)
    steps = {
        name: {"time_ms": median(t.wall), "cpu_time_ms": median(t.cpu), "n": len(t.wall)}
        for name, t in timers.items()
    }
    for name, r in steps.items():
        print(f"train step {name:22s} {r['time_ms']:8.1f} ms (cpu {r['cpu_time_ms']:8.1f})")

    def ratio(a: str, b: str) -> float:
        return round(steps[a]["time_ms"] / steps[b]["time_ms"], 3)

    cfg0 = cfgs["ssr (SAM online)"]
    encoder = instantiate(cfg0.uda.sam.encoder)
    return {
        "what": "one UDA training step (tiny MiT, tiny SAM, demo experiments, synthetic data)",
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": int(cfg0.data.batch_size),
        "crop": list(cfg0.data.crop_size),
        "sam": {"variant": encoder.variant, "input": encoder.input_size},
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
