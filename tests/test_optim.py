"""AdamW groups by mmcv custom keys and the warm-up + poly lr factor (docs/method.md §4.10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssr.optim import param_groups, poly_warmup_factor


@pytest.mark.parametrize(
    ("step", "factor"),
    [
        (0, 1e-6),  # warm-up starts at warmup_ratio
        (750, (1 - 750 / 40000) * (1 - 0.5 * (1 - 1e-6))),  # = 0.98125 * 0.5000005
        (1499, (1 - 1499 / 40000) * (1 - (1 / 1500) * (1 - 1e-6))),
        (1500, 1 - 1500 / 40000),  # = 0.9625, the plain poly curve
        (20000, 0.5),
        (40000, 0.0),
        (45000, 0.0),  # never negative past the end
    ],
)
def test_poly_warmup_factor(step: int, factor: float) -> None:
    assert poly_warmup_factor(step) == pytest.approx(factor, rel=1e-12, abs=1e-15)


def test_poly_power_and_errors() -> None:
    assert poly_warmup_factor(20000, warmup_steps=0, power=2.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="step"):
        poly_warmup_factor(-1)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.attn = nn.Linear(4, 4)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.norm = nn.LayerNorm(4)  # contains both keys: "head" must win
        self.conv_seg = nn.Conv2d(4, 3, 1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(Block())
        self.decode_head = Head()
        self.fusion_layer = nn.Linear(4, 4)  # SSR's new layers match no key
        self.teacher = nn.Linear(4, 4).requires_grad_(False)


def test_param_groups() -> None:
    net = Net()
    groups = param_groups(net.named_parameters(prefix="model"), lr=6e-5, weight_decay=0.01)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in groups for n in g["param_names"]}
    assert by_name["model.decode_head.bn.weight"] == (pytest.approx(6e-4), 0.01)
    assert by_name["model.decode_head.norm.weight"] == (pytest.approx(6e-4), 0.01)
    assert by_name["model.decode_head.conv_seg.bias"] == (pytest.approx(6e-4), 0.01)
    assert by_name["model.backbone.0.norm1.weight"] == (6e-5, 0.0)
    assert by_name["model.backbone.0.norm1.bias"] == (6e-5, 0.0)
    assert by_name["model.backbone.0.attn.weight"] == (6e-5, 0.01)
    assert by_name["model.fusion_layer.bias"] == (6e-5, 0.01)
    assert not any("teacher" in n for n in by_name)  # frozen parameters are left out
    assert len(groups) == 3  # merged by (lr, wd)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    opt = torch.optim.AdamW(groups, lr=6e-5, weight_decay=0.01)  # torch accepts the groups as is
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([6e-5, 6e-5, 6e-4])


def test_param_groups_custom_keys_and_errors() -> None:
    named = [
        ("a.pos_block.w", nn.Parameter(torch.ones(1))),
        ("a.norm.w", nn.Parameter(torch.ones(1))),
    ]
    groups = param_groups(named, lr=1.0, weight_decay=0.1, no_decay_keys=("norm", "pos_block"))
    assert [(g["param_names"], g["weight_decay"]) for g in groups] == [
        (["a.pos_block.w", "a.norm.w"], 0.0)
    ]
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(Net().teacher.named_parameters(), lr=1.0, weight_decay=0.1)
