"""One real training step of the UDA module: gradients where expected and nowhere else."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from torch import Tensor
from torch.utils.data import DataLoader

from ssr.data.formats import CITYSCAPES_CLASSES, ClassSet
from ssr.model.segmentor import Prediction, Segmentor, View
from ssr.run.cli import user_error
from ssr.train import build_module
from ssr.uda.fd import FeatureDistanceConfigError
from ssr.uda.module import NonFiniteLossError, UDAConfigError, UDAModule

from helpers import compose_cfg, cpu_trainer, uda_batch

PAPER_FD = compose_cfg("train", "experiment=daformer").uda.fd  # the DAFormer FD node


def build(experiment: str, *overrides: str, pretrained: Path | None = None) -> UDAModule:
    """The experiment's module; with `pretrained`, FD is switched on with those ImageNet weights."""
    cfg = compose_cfg("train", f"experiment={experiment}", *overrides)
    if pretrained is not None:
        cfg.model.backbone.pretrained = str(pretrained)
        cfg.uda.fd = PAPER_FD
    torch.manual_seed(0)
    return build_module(cfg)


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny backbone saved in the SegFormer ImageNet layout, so that FD is active."""
    from ssr.model.mit import build_mit

    path = tmp_path_factory.mktemp("weights") / "mit_tiny.pth"
    state = build_mit("tiny").state_dict()
    state |= {"head.weight": torch.zeros(1000, 128), "head.bias": torch.zeros(1000)}
    torch.save(state, path)
    return path


def batches(n: int, nan: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        batch = uda_batch(seed=i)
        batch["src_lbl"][:, :2] = 255
        if nan:
            batch["src_img"] = batch["src_img"] * float("nan")
        out.append(batch)
    return out


def fit(module: UDAModule, steps: int, **trainer_kwargs) -> pl.Trainer:
    trainer = cpu_trainer(steps, limit_val_batches=0, **trainer_kwargs)
    trainer.fit(module, DataLoader(batches(steps), batch_size=None))
    return trainer


def test_one_step_gradients_land_only_on_trainable_parts(imagenet_file: Path) -> None:
    module = build("demo_mic_ssr", "uda.sam.stages=[2,3]", pretrained=imagenet_file)
    assert module.fd.weight == 0.005 and module.masking is not None and module.sam is not None
    fit(module, 1)
    for name, p in module.model.named_parameters():
        assert p.grad is not None, f"student parameter {name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    frozen = {
        "teacher": module.teacher,
        "imnet": module.fd.imnet_backbone,
        "sam encoder": module.sam.encoder,
    }
    for what, part in frozen.items():
        for name, p in part.named_parameters():
            assert p.grad is None and not p.requires_grad, f"{what} {name} got a gradient"
    for i in range(4):
        grads = [p.grad for p in module.sam.fusion_layer[i].parameters()]
        grads += [p.grad for p in module.sam.embedding_layer[i].parameters()]
        if i in (2, 3):
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"stage {i}"
        else:
            assert all(g is None for g in grads), f"stage {i} is not selected but got gradients"


def test_teacher_changes_only_through_the_ema_rule() -> None:
    module = build("demo_daformer")
    s0 = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit(module, 1)
    s1 = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    teacher = dict(module.teacher.model.named_parameters())
    for n in s0:  # step 0 copies the student before its first update
        assert torch.equal(teacher[n], s0[n]), n
    assert any(not torch.equal(s0[n], s1[n]) for n in s0)
    module.teacher.update(module.model, step=1)  # alpha_1 = 0.5
    for n in s0:
        torch.testing.assert_close(teacher[n], 0.5 * s0[n] + 0.5 * s1[n])


def test_checkpoint_holds_no_sam_and_optimizer_skips_frozen(tmp_path: Path) -> None:
    module = build("demo_ssr")
    trainer = fit(module, 1)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith("sam.encoder") for k in keys)
    assert "sam.fusion_layer.0.q.weight" in keys and "teacher.model.backbone.norm1.weight" in keys
    assert ckpt["model_config"]["backbone"]["variant"] == "tiny"
    n_opt = sum(len(g["params"]) for g in trainer.optimizers[0].param_groups)
    trainable = [*module.model.parameters()]
    trainable += [p for _, p in module.sam.named_trainable_parameters()]
    assert n_opt == len(trainable)


def test_student_keys_identical_with_and_without_ssr() -> None:
    plain, ssr = build("demo_daformer").model, build("demo_ssr").model
    assert plain.state_dict().keys() == ssr.state_dict().keys()
    assert not any(k.split(".")[0] not in ("backbone", "decode_head") for k in ssr.state_dict())


def test_nan_loss_stops_with_step_and_term() -> None:
    module = build("demo")
    with pytest.raises(NonFiniteLossError, match="'src_ce' is nan at step 0"):
        cpu_trainer(1).fit(module, DataLoader(batches(1, nan=True), batch_size=None))


def test_fd_without_imagenet_weights_is_a_one_line_error() -> None:
    cfg = compose_cfg("train", "experiment=demo_daformer")
    cfg.uda.fd = PAPER_FD  # FD on, but the tiny backbone has no ImageNet weights
    with pytest.raises(InstantiationException) as info:
        build_module(cfg)
    assert isinstance(info.value.__cause__, FeatureDistanceConfigError)
    assert "set uda.fd=null" in user_error(info.value)  # what the CLI prints
    assert build("demo_daformer").fd is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["experiment=demo_daformer", "uda.teacher=null"], "needs both uda.teacher and uda.mixing"),
        (["experiment=demo", "uda/sam=tiny"], "uda.sam is part of self-training"),
    ],
)
def test_inconsistent_parts_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(InstantiationException) as info:
        build_module(compose_cfg("train", *overrides))
    assert isinstance(info.value.__cause__, UDAConfigError)
    assert message in str(info.value.__cause__)


def test_empty_stage_list_is_plain_daformer() -> None:
    assert build("demo_ssr", "uda.sam.stages=[]").sam is None


def test_bf16_mixed_step_on_cpu(imagenet_file: Path) -> None:
    module = build("demo_mic", pretrained=imagenet_file)
    trainer = fit(module, 1, precision="bf16-mixed")
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert {"train/src_ce", "train/mix_ce", "train/mic_ce", "train/fd", "train/pl_weight"} <= set(
        losses
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_single_summed_backward_gives_the_same_gradients(imagenet_file: Path) -> None:
    grads = []
    for single in ("false", "true"):
        module = build("demo_mic", f"uda.single_backward={single}", pretrained=imagenet_file)
        torch.manual_seed(0)  # dropout / drop-path draws
        fit(module, 1)
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_masking_loss_weight_scales_the_masked_loss() -> None:
    logged = {}
    for weight in (1.0, 0.25):
        module = build("demo_mic", f"uda.masking.loss_weight={weight}")
        torch.manual_seed(0)
        trainer = fit(module, 1)
        logged[weight] = float(trainer.callback_metrics["train/mic_ce"])
    assert logged[0.25] == pytest.approx(0.25 * logged[1.0], rel=1e-5)


class TwoViewSegmentor(Segmentor):
    """A multi-resolution student in the shape of HRDA: a half-resolution context view of the
    crop and a full-resolution detail view of its top-left quarter, two weighted predictions."""

    box = (0, 32, 0, 32)

    def train_views(self, x: Tensor, rng: np.random.Generator | None = None) -> list[View]:
        y1, y2, x1, x2 = self.box
        context = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [View(context), View(x[:, :, y1:y2, x1:x2], self.box)]

    def decode_train(
        self, feats: Sequence[list[Tensor]], views: Sequence[View]
    ) -> list[Prediction]:
        return [
            Prediction(self.decode(feats[0]), 0.9),
            Prediction(self.decode(feats[1]), 0.1, self.box),
        ]


def test_a_multi_view_segmentor_trains_through_every_part(imagenet_file: Path) -> None:
    """The loop only uses the segmentor's view/prediction interface: a two-view student trains
    with teacher, ClassMix, FD, MIC and SSR unchanged, and every one of its parameters learns."""
    cfg = compose_cfg("train", "experiment=demo_mic_ssr")
    cfg.model.backbone.pretrained = str(imagenet_file)
    cfg.model._target_ = f"{__name__}.TwoViewSegmentor"
    cfg.uda.fd = PAPER_FD
    torch.manual_seed(0)
    module = build_module(cfg)
    assert isinstance(module.model, TwoViewSegmentor)
    trainer = fit(module, 1)
    logged = set(trainer.callback_metrics)
    assert {
        "train/src_ce",
        "train/ssr_src_ce",
        "train/fd",
        "train/mix_ce",
        "train/mic_ce",
    } <= logged
    for name, p in module.model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_own_classes_set_the_metrics_and_fd(imagenet_file: Path) -> None:
    """configure_classes: a head of the data's size; with an own class list FD must count the
    data's thing classes and downscales labels of K > 19 classes (a 19-class default would
    refuse label 20 mid-training)."""
    names = tuple(f"c{i}" for i in range(21))
    own = ClassSet(names, ((0, 0, 0),) * 21, thing_classes=(6, 7, 20))
    module = build("demo_daformer", pretrained=imagenet_file)
    with pytest.raises(UDAConfigError, match=r"set model\.decode_head\.num_classes=21"):
        module.configure_classes(own, {})
    module = build("demo_daformer", "model.decode_head.num_classes=21", pretrained=imagenet_file)
    with pytest.raises(UDAConfigError, match=r"set uda.fd.classes to them or uda.fd=null"):
        module.configure_classes(own, {})
    module.fd.classes = [6, 7, 20]
    module.configure_classes(own, {"mIoUx": [0, 20]})
    assert module.val_metric.class_names == names and module.test_metric.subsets == {
        "mIoUx": (0, 20)
    }
    label = torch.full((1, 64, 64), 20)
    feats = module.model.backbone(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(module.fd(feats[-1], torch.zeros(1, 3, 64, 64), label))
    cityscapes = build("demo_daformer", pretrained=imagenet_file)
    cityscapes.configure_classes(CITYSCAPES_CLASSES, {})  # Cityscapes: FD as configured
    assert cityscapes.fd.classes == [6, 7, 11, 12, 13, 14, 15, 16, 17, 18]
