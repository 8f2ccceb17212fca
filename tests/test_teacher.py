"""EMA teacher: the DACS decay rule and the pseudo-label weight (docs/method.md §4.4, §4.5)."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ssr.uda.teacher import EMATeacher


class TinySegNet(nn.Module):
    """Conv + BN + dropout + drop-path segmentation net whose logits have the input size."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dropout = nn.Dropout2d(0.5)
        self.drop_path = DropPath(0.5)
        self.conv_seg = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.conv_seg(self.dropout(h + self.drop_path(h)))


class FixedLogits(nn.Module):
    """A 'network' whose output is a stored logit tensor, for pseudo-label weights by hand."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits


class Scalar(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([value], dtype=torch.float64))


@pytest.mark.parametrize(
    ("step", "alpha"),
    [(0, 0.0), (1, 0.5), (9, 0.9), (99, 0.99), (999, 0.999), (5000, 0.999)],
)
def test_alpha_schedule(step: int, alpha: float) -> None:
    teacher = EMATeacher(Scalar(0.0), alpha=0.999)
    assert teacher.alpha_at(step) == pytest.approx(alpha, abs=1e-12)
    assert teacher.alpha_at(step) <= 0.999


def test_first_updates_by_hand() -> None:
    student = Scalar(2.0)
    teacher = EMATeacher(Scalar(-7.0), alpha=0.999)  # different start: step 0 must overwrite it
    teacher.update(student, step=0)
    assert teacher.model.w.item() == 2.0  # copy
    student.w.data.fill_(4.0)
    teacher.update(student, step=1)
    assert teacher.model.w.item() == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)  # = 3
    student.w.data.fill_(6.0)
    teacher.update(student, step=2)
    assert teacher.model.w.item() == pytest.approx(2 / 3 * 3.0 + 1 / 3 * 6.0)  # = 4
    student.w.data.fill_(10.0)
    teacher.update(student, step=5000)
    assert teacher.model.w.item() == pytest.approx(0.999 * 4.0 + 0.001 * 10.0)
    assert not teacher.model.w.requires_grad
    assert student.w.requires_grad


def test_update_averages_parameters_not_buffers() -> None:
    torch.manual_seed(0)
    student = TinySegNet()
    teacher = EMATeacher(student)
    buffers_before = {k: v.clone() for k, v in teacher.model.named_buffers()}
    student.train()
    student(torch.randn(2, 3, 8, 8))  # changes the student's BN running stats
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, step=0)
    teacher.update(student, step=1)
    for name, buf in teacher.model.named_buffers():
        assert torch.equal(buf, buffers_before[name]), name
    assert not torch.equal(student.bn.running_mean, teacher.model.bn.running_mean)
    for (name, pt), ps in zip(teacher.model.named_parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(pt, ps, msg=name)  # copy then EMA of the same values
        assert not pt.requires_grad


def test_update_rejects_other_architecture() -> None:
    with pytest.raises(ValueError, match="parameter names"):
        EMATeacher(TinySegNet()).update(Scalar(1.0), step=0)


def test_pseudo_label_dropout_off_bn_train() -> None:
    torch.manual_seed(0)
    teacher = EMATeacher(TinySegNet(), ignore_top=0, ignore_bottom=0)
    teacher.eval()  # whatever the surrounding mode, pseudo-labelling uses BN train mode
    img = torch.randn(2, 3, 16, 16)
    running_before = teacher.model.bn.running_mean.clone()
    lbl1, w1 = teacher.pseudo_label(img)
    lbl2, w2 = teacher.pseudo_label(img)
    assert teacher.model.bn.training
    assert not teacher.model.dropout.training and not teacher.model.drop_path.training
    assert torch.equal(lbl1, lbl2) and torch.equal(w1, w2)  # dropout / drop-path inactive
    assert not torch.equal(teacher.model.bn.running_mean, running_before)  # batch stats used
    assert lbl1.shape == (2, 16, 16) and lbl1.dtype == torch.int64
    assert w1.shape == (2, 16, 16) and w1.dtype == torch.float32
    assert not w1.requires_grad

    eval_teacher = EMATeacher(TinySegNet(), bn_eval=True)
    eval_teacher.pseudo_label(img)
    assert not eval_teacher.model.bn.training


def test_pseudo_label_weight_and_crop_rows_by_hand() -> None:
    # 2 classes; logit gap d gives confidence sigmoid(d). 40 of 2*8*8 = 128 pixels at 0.99,
    # the rest at 0.9 (below 0.968) -> q = 40 / 128 = 0.3125 everywhere but the cropped rows.
    b, h, w = 2, 8, 8
    gap = torch.full((b, h, w), math.log(9.0))  # confidence 0.9
    gap.view(-1)[torch.randperm(b * h * w, generator=torch.Generator().manual_seed(0))[:40]] = (
        math.log(99.0)  # confidence 0.99
    )
    sign = torch.ones(b, h, w)
    sign[:, :, : w // 2] = -1  # left half predicts class 1, right half class 0
    logits = torch.stack([sign * gap / 2, -sign * gap / 2], dim=1)
    teacher = EMATeacher(FixedLogits(logits), ignore_top=1, ignore_bottom=2)
    label, weight = teacher.pseudo_label(torch.zeros(b, 3, h, w))
    expected_label = torch.zeros(b, h, w, dtype=torch.long)
    expected_label[:, :, : w // 2] = 1
    assert torch.equal(label, expected_label)  # low-confidence pixels keep their label
    expected_w = torch.full((b, h, w), 0.3125)
    expected_w[:, :1] = 0.0  # top row
    expected_w[:, -2:] = 0.0  # bottom two rows
    torch.testing.assert_close(weight, expected_w)
    # threshold 0.5 makes every pixel confident; no crop rows
    everything = EMATeacher(FixedLogits(logits), threshold=0.5, ignore_top=0, ignore_bottom=0)
    _, weight_all = everything.pseudo_label(torch.zeros(b, 3, h, w))
    torch.testing.assert_close(weight_all, torch.ones(b, h, w))


def test_valid_mask_zeroes_the_weight_after_q_counts_every_pixel() -> None:
    # 1 image of 4x4, 2 classes: the top row confident (0.99), the rest not (0.9) -> q = 4/16.
    # The valid mask removes the top row: q stays 0.25 (HRDA counts the margins in q), the top
    # row's weight becomes 0 and so does the masked right column.
    gap = torch.full((1, 4, 4), math.log(9.0))
    gap[:, 0] = math.log(99.0)
    logits = torch.stack([gap / 2, -gap / 2], dim=1)
    valid = torch.ones(1, 4, 4)
    valid[:, 0], valid[:, :, 3] = 0.0, 0.0
    teacher = EMATeacher(FixedLogits(logits), ignore_top=0, ignore_bottom=0)
    label, weight = teacher.pseudo_label(torch.zeros(1, 3, 4, 4), valid)
    assert torch.equal(label, torch.zeros(1, 4, 4, dtype=torch.long))
    expected = torch.tensor([[0.0] * 4] + [[0.25, 0.25, 0.25, 0.0]] * 3).unsqueeze(0)
    torch.testing.assert_close(weight, expected)
    _, unmasked = teacher.pseudo_label(torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(unmasked, torch.full((1, 4, 4), 0.25))
    with pytest.raises(ValueError, match="valid mask"):
        teacher.pseudo_label(torch.zeros(1, 3, 4, 4), valid[:, None])


def test_default_crop_rows_on_512_rows() -> None:
    logits = torch.zeros(1, 2, 512, 4)
    logits[:, 0] = 10.0  # confidence ~1 everywhere -> q = 1
    _, weight = EMATeacher(FixedLogits(logits)).pseudo_label(torch.zeros(1, 3, 512, 4))
    rows = weight[0, :, 0]
    assert rows[:15].eq(0).all() and rows[15:392].eq(1).all() and rows[392:].eq(0).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        EMATeacher(Scalar(0.0), alpha=1.0)
    with pytest.raises(ValueError, match="crop rows"):
        EMATeacher(Scalar(0.0), ignore_top=-1)


def test_pseudo_label_with_the_real_tiny_segmentor() -> None:
    from ssr.model.daformer_head import DAFormerHead
    from ssr.model.mit import build_mit
    from ssr.model.segmentor import Segmentor

    torch.manual_seed(0)
    backbone = build_mit("tiny", drop_path_rate=0.5)
    student = Segmentor(backbone, DAFormerHead(backbone.embed_dims, embed_dim=16, channels=16))
    teacher = EMATeacher(student, ignore_top=2, ignore_bottom=4)
    teacher.update(student, step=0)
    img = torch.randn(2, 3, 64, 64)
    (lbl1, w1), (lbl2, w2) = teacher.pseudo_label(img), teacher.pseudo_label(img)
    assert torch.equal(lbl1, lbl2) and torch.equal(w1, w2)  # head dropout and drop-path are off
    assert lbl1.shape == (2, 64, 64) and w1[:, :2].eq(0).all() and w1[:, -4:].eq(0).all()
    norms = [m for m in teacher.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.training for m in norms)  # the head's BN uses batch statistics
    assert not any(p.requires_grad for p in teacher.parameters())
    buffers = [b.clone() for b in teacher.model.buffers()]
    conf = teacher.confidence(img)  # what the debug panels draw: same pass, BN stats restored
    assert conf.shape == (2, 64, 64) and conf.le(1).all() and conf.ge(1 / 19).all()
    assert all(torch.equal(a, b) for a, b in zip(buffers, teacher.model.buffers(), strict=True))
