"""Mixed precision (issue 5): fp16 autocast + gradient scaling through one SSR step on CPU, SAM
inside the same autocast region, and the `precision: auto` rule."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ssr.train import _auto_precision, build_module
from ssr.uda.module import UDAModule

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(experiment: str, *overrides: str) -> UDAModule:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
    torch.manual_seed(0)
    return build_module(cfg)


def batch(size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lbl = torch.randint(0, 19, (2, size // 8, size // 8), generator=g)
    return {
        "src_img": torch.randn(2, 3, size, size, generator=g),
        "src_lbl": lbl.repeat_interleave(8, 1).repeat_interleave(8, 2),
        "tgt_img": torch.randn(2, 3, size, size, generator=g),
    }


def test_fp16_mixed_ssr_step_on_cpu_runs_sam_in_autocast() -> None:
    """Lightning maps `16-mixed` on CPU to bf16; the plugin forces real fp16 + GradScaler."""
    module = build("demo_mic_ssr", "uda.sam.stages=[3]")
    dtypes: list[torch.dtype] = []
    # SAM's own LayerNorm2d promotes the neck's output back to fp32; its attention runs in fp16.
    qkv = module.sam.encoder.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    )
    trainer.fit(module, DataLoader([batch()], batch_size=None))
    assert dtypes == [torch.float16]  # SAM ran inside the step's autocast region
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert {"train/src_ce", "train/ssr_src_ce", "train/mix_ce", "train/mic_ce"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert scaler.get_scale() == 2.0**8  # no inf/nan gradient: the step was taken, not skipped
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # fp32 master weights


def test_auto_precision_rule() -> None:
    cpu = OmegaConf.create({"precision": "auto", "accelerator": "cpu"})
    assert _auto_precision(cpu) == "32-true"
    assert _auto_precision(OmegaConf.create({"precision": "16-mixed"})) == "16-mixed"
    gpu = OmegaConf.create({"precision": "auto", "accelerator": "gpu"})
    if torch.cuda.is_available():
        bf16 = torch.cuda.get_device_capability() >= (8, 0)
        assert _auto_precision(gpu) == ("bf16-mixed" if bf16 else "16-mixed")
    else:
        assert _auto_precision(gpu) == "32-true"  # no GPU here: Lightning would fail anyway
