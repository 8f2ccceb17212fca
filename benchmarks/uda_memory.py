"""Peak memory of one UDA training step: separate backward calls (the reference) vs one summed loss.

docs/method.md §4.9: the reference back-propagates each loss group as soon as it is computed, so
the activations of the source pass are freed before the mixed pass runs. Our step must never need
more memory than a single summed-loss implementation; this measures both side by side
(`uda.single_backward=false|true`, same seed, same batch) for DAFormer, MIC and MIC + SSR, with
the ImageNet feature distance on (`uda.fd` of uda=dacs, fed a randomly initialised backbone saved
as ImageNet weights) although the demo experiments turn it off.

    python benchmarks/uda_memory.py [--device cpu|cuda] [--model daformer_mitb0] [--size 128]
                                    [--batch 2] [--out benchmarks/results/uda_memory.json]
    smoke run (never the committed file): --model daformer_tiny --size 64 --out /tmp/uda_memory.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict
from peak_memory import peak_bytes
from torch.utils.data import DataLoader

from ssr import CONF_MODULE
from ssr.data.stream import CropRecord
from ssr.model.mit import build_mit
from ssr.train import build_module

EXPERIMENTS = ("demo_daformer", "demo_mic", "demo_mic_ssr")


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return compose("train", overrides=overrides)


def _imagenet_file(variant: str, folder: Path) -> Path:
    """A randomly initialised backbone saved in the SegFormer layout, so that FD runs."""
    path = folder / f"mit_{variant}.pth"
    torch.save(build_mit(variant).state_dict(), path)
    return path


def _batch(size: int, batch: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    lbl = torch.randint(0, 19, (batch, size // 32, size // 32), generator=g)
    lbl = lbl.repeat_interleave(32, 1).repeat_interleave(32, 2)
    box = torch.tensor([[size, size, 0, 0, 0]] * batch)  # read only by a SAM feature cache
    return {
        "src_img": torch.randn(batch, 3, size, size, generator=g),
        "src_lbl": lbl,
        "tgt_img": torch.randn(batch, 3, size, size, generator=g),
        "src_crop": CropRecord([f"src{i}.png" for i in range(batch)], box),  # type: ignore[arg-type]
        "tgt_crop": CropRecord([f"tgt{i}.png" for i in range(batch)], box),  # type: ignore[arg-type]
    }


def one_step_trainer(
    device: str,
    precision: str = "32-true",
    callbacks: list[pl.Callback] | None = None,
    max_steps: int = 1,
) -> pl.Trainer:
    """A quiet trainer for `max_steps` optimiser steps (one by default), without validation or
    checkpoints."""
    return pl.Trainer(
        callbacks=callbacks,
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def step_peak(
    experiment: str, single: bool, args: argparse.Namespace, weights: Path, fd: DictConfig
) -> dict[str, Any]:
    cfg = _compose(
        [
            f"experiment={experiment}",
            f"model={args.model}",
            f"model.backbone.pretrained={weights}",
            f"uda.single_backward={str(single).lower()}",
            f"uda.teacher.ignore_top={args.size * 15 // 512}",
            f"uda.teacher.ignore_bottom={args.size * 120 // 512}",
        ]
    )
    with open_dict(cfg):
        cfg.uda.fd = fd
    torch.manual_seed(0)
    module = build_module(cfg)
    trainer = one_step_trainer(args.device)
    loader = DataLoader([_batch(args.size, args.batch)], batch_size=None)
    start = time.perf_counter()
    peak, _ = peak_bytes(torch.device(args.device), lambda: trainer.fit(module, loader))
    return {"peak_bytes": peak, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="daformer_mitb0")
    parser.add_argument("--size", type=int, default=128, help="square crop side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/uda_memory.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"setup": vars(args).copy(), "steps": {}}
    # The FD node of DAFormer's self-training config (uda=dacs); the demo experiments set it null.
    fd = _compose(["uda=dacs"]).uda.fd
    variant = _compose([f"model={args.model}"]).model.backbone.variant
    with tempfile.TemporaryDirectory() as tmp:
        weights = _imagenet_file(variant, Path(tmp))
        for exp in EXPERIMENTS:
            separate = step_peak(exp, False, args, weights, fd)
            summed = step_peak(exp, True, args, weights, fd)
            ratio = separate["peak_bytes"] / summed["peak_bytes"]
            results["steps"][exp] = {"separate": separate, "summed": summed, "ratio": ratio}
            print(
                f"{exp:14s} separate {separate['peak_bytes'] / 2**20:8.1f} MiB   "
                f"summed {summed['peak_bytes'] / 2**20:8.1f} MiB   separate/summed {ratio:.2f}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
