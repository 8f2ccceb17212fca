"""Mixed precision: fp16 autocast + gradient scaling through one SSR step on CPU, SAM inside the
same autocast region, and the `precision: auto` rule."""

from __future__ import annotations

import torch
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from ssr.run.trainer import auto_precision
from ssr.train import build_module

from helpers import compose_cfg, cpu_trainer, uda_batch


def test_fp16_mixed_ssr_step_on_cpu_runs_sam_in_autocast() -> None:
    """Lightning maps `16-mixed` on CPU to bf16; the plugin forces real fp16 + GradScaler."""
    torch.manual_seed(0)
    module = build_module(compose_cfg("train", "experiment=demo_mic_ssr", "uda.sam.stages=[3]"))
    dtypes: list[torch.dtype] = []
    # SAM's own LayerNorm2d promotes the neck's output back to fp32; its attention runs in fp16.
    qkv = module.sam.encoder.encoder.blocks[0].attn.qkv
    qkv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer = cpu_trainer(
        max_steps=1, limit_val_batches=0, plugins=[MixedPrecision("16-mixed", "cpu", scaler)]
    )
    batch = uda_batch(batch=2, size=32, seed=1, block=8)
    trainer.fit(module, DataLoader([batch], batch_size=None))
    assert dtypes == [torch.float16]  # SAM ran inside the step's autocast region
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert {"train/src_ce", "train/ssr_src_ce", "train/mix_ce", "train/mic_ce"} <= set(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert scaler.get_scale() == 2.0**8  # no inf/nan gradient: the step was taken, not skipped
    assert any(not torch.equal(p, before[n]) for n, p in module.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # fp32 master weights


def test_auto_precision_rule() -> None:
    cpu = OmegaConf.create({"precision": "auto", "accelerator": "cpu"})
    assert auto_precision(cpu) == "32-true"
    assert auto_precision(OmegaConf.create({"precision": "16-mixed"})) == "16-mixed"
    gpu = OmegaConf.create({"precision": "auto", "accelerator": "gpu"})
    if torch.cuda.is_available():
        bf16 = torch.cuda.get_device_capability() >= (8, 0)
        assert auto_precision(gpu) == ("bf16-mixed" if bf16 else "16-mixed")
    else:
        assert auto_precision(gpu) == "32-true"  # no GPU here: Lightning would fail anyway
