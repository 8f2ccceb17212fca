"""The optional speed modes of the training step: channels-last weights and torch.compile give
the reference's numbers to rounding, keep checkpoints' keys, and compile only the trained
networks (the student and SAM), never the teacher or the FD copy."""

from __future__ import annotations

import pytest
import torch
from test_uda_module import build, fit

from ssr.uda.module import UDAModule
from ssr.uda.transfer import to_device

COMPILE = ("uda.compile=true", "uda.sam.encoder.compile=true")


def one_step(*overrides: str, steps: int = 1) -> tuple[UDAModule, dict[str, float]]:
    module = build("demo_mic_ssr", *overrides)
    torch.manual_seed(0)  # drop-path draws
    trainer = fit(module, steps)
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("ce")}
    return module, losses


@pytest.fixture(scope="module")
def eager() -> tuple[UDAModule, dict[str, float]]:
    return one_step()


def test_channels_last_gives_the_same_losses_and_gradients(eager) -> None:
    module, losses = one_step("uda.channels_last=true")
    ref, ref_losses = eager
    assert losses.keys() == ref_losses.keys() and len(losses) == 5  # src, mix, mic + SSR's two
    for name, value in losses.items():
        assert value == pytest.approx(ref_losses[name], rel=1e-5), name
    grads = dict(ref.model.named_parameters())
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    convs = {
        "student": module.model.backbone.patch_embed1.proj.weight,
        "teacher": module.teacher.model.backbone.patch_embed1.proj.weight,
        "SAM": module.sam.encoder.encoder.patch_embed.proj.weight,
    }
    for what, weight in convs.items():
        assert weight.is_contiguous(memory_format=torch.channels_last), what
        assert not weight.is_contiguous(), what  # really reordered (not a 1x1 no-op)
    assert module.state_dict().keys() == ref.state_dict().keys()


def test_compile_marks_only_the_trained_networks_and_keeps_checkpoint_keys() -> None:
    module = build("demo_mic_ssr", *COMPILE)
    compiled = lambda m: m._compiled_call_impl is not None  # noqa: E731
    assert compiled(module.model.backbone) and compiled(module.model.decode_head)
    assert compiled(module.sam.encoder.encoder)
    assert not compiled(module.teacher.model.backbone)  # no_grad pseudo-labels stay eager
    assert module.hparams["compile"] is True
    eager_keys = build("demo_mic_ssr").state_dict().keys()
    assert module.state_dict().keys() == eager_keys  # no `_orig_mod.` prefixes


@pytest.mark.slow
def test_compiled_steps_match_eager_mode() -> None:
    """Two inductor-compiled steps (about 90 s of compilation on two CPU cores) against eager:
    every loss term within 1e-5 relative, every weight within 1e-5."""
    eager_module, eager_losses = one_step(steps=2)
    module, losses = one_step(*COMPILE, steps=2)
    for name, value in losses.items():
        assert value == pytest.approx(eager_losses[name], rel=1e-5), name
    weights = dict(eager_module.model.named_parameters())
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-5, msg=name)


def test_to_device_converts_on_the_host_first_with_the_same_values() -> None:
    x = torch.rand(5, dtype=torch.float64)
    out = to_device(x, "cpu", torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, x.to(torch.float32))
    assert to_device(out, torch.device("cpu")) is out  # nothing to copy
