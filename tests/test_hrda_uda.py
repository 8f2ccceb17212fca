"""HRDA in the UDA loop (docs/hrda.md §4-§5 and the SSR-on-HRDA design): FD on the context view,
gradients after one real step, SSR's options A/B/C, and a shipped student without SSR weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ssr.data.labels import THING_CLASSES
from ssr.errors import ConfigError
from ssr.model.hrda import HRDASegmentor
from ssr.model.mit import MIT_VARIANTS, build_mit
from ssr.train import build_module
from ssr.uda.losses import downscale_label_ratio, feature_distance
from ssr.uda.module import UDAModule
from ssr.uda.sam_encoder import SamEncoder
from ssr.uda.ssr import SSRRegularizer

from helpers import compose_cfg, cpu_trainer, uda_batch

TINY = MIT_VARIANTS["tiny"]


def ce(logits: Tensor, label: Tensor, weight: Tensor) -> Tensor:
    """mmseg-0.16 CE restated: logits resized to the label, ignored pixels in the denominator."""
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return (F.cross_entropy(logits, label, ignore_index=255, reduction="none") * weight).mean()


def build(experiment: str, *overrides: str, imagenet: Path | None = None) -> UDAModule:
    """The experiment's module; with `imagenet`, the paper's FD on those backbone weights.
    (`++uda.sam.views` / `++uda.sam.detail_keys`: the uda/sam nodes do not declare them.)"""
    cfg = compose_cfg("train", f"experiment={experiment}", *overrides)
    if imagenet is not None:
        cfg.model.backbone.pretrained = str(imagenet)
        cfg.uda.fd = compose_cfg("train", "experiment=hrda").uda.fd
    torch.manual_seed(0)
    return build_module(cfg)


@dataclass
class Step:
    """One training step of a module and what the hooks saw during it."""

    module: UDAModule
    batch: dict[str, Any]
    trainer: pl.Trainer | None = None
    seen: dict[str, list[Any]] = field(default_factory=dict)

    def record(self, name: str, module: torch.nn.Module, what: str = "shape") -> None:
        """Log each call of `module`: its input shape, or (input, last output) ("io")."""
        log = self.seen.setdefault(name, [])
        if what == "io":
            module.register_forward_hook(lambda m, a, out: log.append((a[0], out[-1])))
        elif what == "args":
            module.register_forward_pre_hook(lambda m, a: log.append(a))
        else:
            module.register_forward_pre_hook(lambda m, a: log.append(tuple(a[0].shape)))

    def fit(self) -> Step:
        self.trainer = cpu_trainer(1, limit_val_batches=0)
        self.trainer.fit(self.module, DataLoader([self.batch], batch_size=None))
        return self


def batch128() -> dict[str, Any]:
    """Two 128 crops (1024 / 8) with 64 px label blocks: whole FD cells, some of them things."""
    return uda_batch(batch=2, size=128, seed=0, block=64)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny MiT weights in the SegFormer layout, so that FD is active."""
    path = tmp_path_factory.mktemp("weights") / "mit_tiny.pth"
    torch.save(build_mit("tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def hrda_step(imagenet_file: Path) -> Step:
    """experiment=demo_hrda with FD, one step; the student's backbone calls, FD's arguments and the
    ImageNet copy's inputs recorded."""
    step = Step(build("demo_hrda", imagenet=imagenet_file), batch128())
    step.seen["src_img"] = [step.batch["src_img"].clone()]
    step.record("backbone", step.module.model.backbone, "io")
    step.record("fd", step.module.fd, "args")
    step.record("imnet", step.module.fd.imnet_backbone)
    return step.fit()


@pytest.fixture(scope="module")
def ssr_step() -> Step:
    """experiment=demo_mic_ssr_hrda (MIC + SSR option B), one step; SAM encoder calls recorded."""
    step = Step(build("demo_mic_ssr_hrda"), batch128())
    step.record("sam", step.module.sam.encoder.encoder)
    return step.fit()


# ----------------------------------------------------------------------------- FD
def test_fd_reads_the_context_views_last_stage(hrda_step: Step) -> None:
    """FD gets the stage-4 map (2×2) of the backbone call on the context view (the crop's 2×2
    block mean, 64²), and the ImageNet copy sees that same 64² view."""
    feat, image, label = hrda_step.seen["fd"][0]
    assert len(hrda_step.seen["fd"]) == 1
    assert feat.shape == (2, 128, 2, 2) and image.shape == (2, 3, 64, 64)
    assert any(inp is image and out is feat for inp, out in hrda_step.seen["backbone"])
    src = hrda_step.seen["src_img"][0]
    torch.testing.assert_close(image, src.reshape(2, 3, 64, 2, 64, 2).mean((3, 5)))
    assert torch.equal(label, hrda_step.batch["src_lbl"]) and label.shape[-1] // 2 == 64
    assert hrda_step.seen["imnet"] == [(2, 3, 64, 64)]
    assert float(hrda_step.trainer.callback_metrics["train/fd"]) > 0


def test_fd_label_cells_at_factor_64() -> None:
    """A 128² label on the 2×2 context stage-4 grid: TL car → 13; TR 48 of 64 rows person
    (ratio 0.75 ≥ 0.75) → 11; BL vegetation → 8; BR 40 rows ignore → 255. FD = mean over the two
    thing cells of ‖Δ‖ = (5 + 12) / 2; the stuff and ignore cells (Δ = 100) do not count."""
    label = torch.zeros(1, 128, 128, dtype=torch.long)
    label[:, :64, :64] = 13
    label[:, :48, 64:] = 11
    label[:, 64:, :64] = 8
    label[:, 64:104, 64:] = 255
    label[:, 104:, 64:] = 13
    cells = downscale_label_ratio(label, 64, 0.75)
    assert cells.tolist() == [[[13, 11], [8, 255]]]
    imnet = torch.zeros(1, 128, 2, 2)
    imnet[0, 0, 0, 0], imnet[0, 1, 0, 0] = 3.0, 4.0
    imnet[0, 2, 0, 1] = 12.0
    imnet[0, 3, 1, :] = 100.0
    fd = feature_distance(torch.zeros(1, 128, 2, 2), imnet, label, THING_CLASSES)
    assert fd.item() == pytest.approx(8.5)


# ----------------------------------------------------------------------------- gradients
def assert_student_learns(module: UDAModule) -> None:
    """Every student parameter has a finite gradient, and each part a non-zero one."""
    for name, p in module.model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for part in ("backbone", "decode_head.head", "decode_head.scale_attention"):
        grads = [p.grad for n, p in module.model.named_parameters() if n.startswith(part + ".")]
        assert grads and any(g.abs().sum() > 0 for g in grads), part


def assert_frozen(**parts: torch.nn.Module) -> None:
    for what, part in parts.items():
        for name, p in part.named_parameters():
            assert p.grad is None and not p.requires_grad, f"{what} {name} got a gradient"


def test_hrda_step_gradients(hrda_step: Step) -> None:
    module = hrda_step.module
    assert isinstance(module.model, HRDASegmentor)
    assert_student_learns(module)
    assert_frozen(teacher=module.teacher.model, imnet=module.fd.imnet_backbone)


def test_ssr_hrda_step_gradients_and_one_sam_pass(ssr_step: Step) -> None:
    """Option B: one SAM call on the source + mixed pair (4 images at SAM's 128 input); the
    projections and cross-attentions of all four stages learn, SAM and the teacher do not."""
    module = ssr_step.module
    assert {"train/ssr_src_ce", "train/ssr_mix_ce", "train/mic_ce"} <= set(
        ssr_step.trainer.callback_metrics
    )
    assert_student_learns(module)
    assert_frozen(teacher=module.teacher.model, sam=module.sam.encoder)
    for i in range(4):
        layers = [
            *module.sam.embedding_layer[i].parameters(),
            *module.sam.fusion_layer[i].parameters(),
        ]
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers), f"stage {i}"
    assert ssr_step.seen["sam"] == [(4, 3, 128, 128)]


def test_own_view_runs_sam_on_each_detail_view() -> None:
    """Option C: besides the pair, SAM sees the detail view (64², stretched to its 128 input) of
    the source step and of the mixed step."""
    step = Step(build("demo_mic_ssr_hrda", "++uda.sam.detail_keys=own_view"), batch128())
    step.record("inner", step.module.sam.encoder.encoder)
    step.record("outer", step.module.sam.encoder)
    step.fit()
    assert step.seen["inner"] == [(4, 3, 128, 128), (2, 3, 128, 128), (2, 3, 128, 128)]
    assert step.seen["outer"] == [(2, 3, 64, 64), (2, 3, 64, 64)]


# ----------------------------------------------------------------------------- SSR options
@torch.no_grad()
@pytest.mark.parametrize(
    ("views", "keys"), [("all", "shared"), ("context", "shared"), ("all", "own_view")]
)
def test_enhanced_loss_options(views: str, keys: str) -> None:
    """B: both views fused with the crop's SAM tokens, loss 0.9·CE_fused + 0.1·CE_HR. A: the
    detail features stay plain and the HR term (= the shadow's) is dropped: 0.9·CE_fused.
    C: the detail view attends to SAM's tokens of itself."""
    module = build("demo_mic_ssr_hrda", f"++uda.sam.views={views}", f"++uda.sam.detail_keys={keys}")
    model, sam = module.model.eval(), module.sam
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 128, 128, generator=g)
    label = torch.randint(0, 19, (2, 128, 128), generator=g)
    weight = torch.rand(2, 128, 128, generator=g)
    views_ = model.train_views(x, rng=np.random.default_rng(0))
    feats = [model.features(v.image) for v in views_]
    tokens = sam.encoder(x)
    loss, fused = sam.enhanced_loss(model, views_, feats, tokens, label, weight)
    assert all(not torch.equal(a, b) for a, b in zip(fused[0], feats[0], strict=True))
    detail: Tensor | None = {
        "context": None,
        "shared": tokens,
        "own_view": sam.encoder(views_[1].image),
    }["context" if views == "context" else keys]
    if detail is None:
        assert fused[1] is feats[1]
    else:
        expected_detail = sam.fuse(feats[1], detail)
        for a, b in zip(fused[1], expected_detail, strict=True):
            torch.testing.assert_close(a, b)
    fused_logits, hr_logits = (p.logits for p in model.decode_train(fused, views_))
    y1, y2, x1, x2 = views_[1].box
    expected = 0.9 * ce(fused_logits, label, weight)
    if views == "all":
        expected = expected + 0.1 * ce(hr_logits, label[:, y1:y2, x1:x2], weight[:, y1:y2, x1:x2])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("other", [{"views": "context"}, {"cache_dir": "sam_cache"}])
def test_own_view_needs_both_views_and_online_sam(other: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="detail_keys=own_view"):
        SSRRegularizer(
            SamEncoder("tiny"), TINY.embed_dims, TINY.num_heads, detail_keys="own_view", **other
        )


# ----------------------------------------------------------------------------- shipping
def test_ssr_adds_nothing_to_the_shipped_hrda(hrda_step: Step, ssr_step: Step) -> None:
    """Zero inference overhead: SAM and its fusion live on the UDA module, not in `model`."""
    plain, ssr = hrda_step.module.model, ssr_step.module.model
    assert plain.state_dict().keys() == ssr.state_dict().keys()
    count = [sum(p.numel() for p in m.parameters()) for m in (plain, ssr)]
    assert count[0] == count[1]
    prefixes = {".".join(k.split(".")[:2]) for k in ssr.state_dict()}
    assert {"decode_head.head", "decode_head.scale_attention"} <= prefixes
    assert {p.split(".")[0] for p in prefixes} == {"backbone", "decode_head"}
