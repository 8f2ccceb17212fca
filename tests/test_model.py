"""MiT, DAFormer head, Segmentor, test protocol: sizes, keys, shapes, gradients, inference
(docs/method.md §1-§3)."""

from __future__ import annotations

from functools import partial
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssr.errors import ConfigError
from ssr.model import DAFormerHead, Inference, Prediction, Segmentor, View, build_mit
from ssr.model.inference import window_spans
from ssr.model.mit import MIT_VARIANTS, Attention

TINY_DIMS = MIT_VARIANTS["tiny"].embed_dims


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def daformer(variant: str, embed_dim: int = 256, num_classes: int = 19) -> Segmentor:
    dims = MIT_VARIANTS[variant].embed_dims
    head = DAFormerHead(dims, num_classes=num_classes, embed_dim=embed_dim, channels=embed_dim)
    return Segmentor(build_mit(variant), head)


@pytest.fixture
def tiny() -> Segmentor:
    torch.manual_seed(0)
    return daformer("tiny", embed_dim=32)


def test_parameter_counts_match_reference() -> None:
    """Reference counts (docs/method.md §1-§2); the meta device builds B5 without allocating."""
    with torch.device("meta"):
        assert n_params(build_mit("b5")) == 81_443_008
        assert n_params(daformer("b5")) == 85_155_283
        assert n_params(daformer("b0")) == 6_900_595


def test_mit_b5_key_layout_and_shapes() -> None:
    """The upstream keys of §1.8, which SegFormer's mit_b5.pth must hit one for one."""
    with torch.device("meta"):
        sd = build_mit("b5").state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["patch_embed1.proj.weight"] == (64, 3, 7, 7)
    assert shapes["patch_embed4.proj.weight"] == (512, 320, 3, 3)
    assert shapes["block1.2.attn.sr.weight"] == (64, 64, 8, 8)
    assert shapes["block3.39.attn.sr.weight"] == (320, 320, 2, 2)
    assert shapes["block2.5.attn.kv.weight"] == (256, 128)
    assert shapes["block3.0.mlp.dwconv.dwconv.weight"] == (1280, 1, 3, 3)
    assert shapes["block4.2.mlp.fc2.weight"] == (512, 2048)
    assert shapes["norm4.bias"] == (512,)
    assert not any(k.startswith("block4.") and ".attn.sr." in k for k in sd)  # sr = 1
    assert not any(k.startswith("block4.") and ".attn.norm." in k for k in sd)
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in sd if k.startswith("block")}
    assert len(blocks) == 52
    allowed = ("patch_embed", "block", "norm")
    assert all(k.startswith(allowed) for k in sd)


def test_head_key_layout_and_shapes() -> None:
    """The mmcv-style head keys of §2.5."""
    with torch.device("meta"):
        sd = DAFormerHead((64, 128, 320, 512)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "embed_layers.3.proj.weight": (256, 512),
        "fuse_layer.aspp_modules.0.conv.weight": (256, 1024, 1, 1),
        "fuse_layer.aspp_modules.0.bn.running_var": (256,),
        "fuse_layer.aspp_modules.2.depthwise_conv.conv.weight": (1024, 1, 3, 3),
        "fuse_layer.aspp_modules.2.depthwise_conv.bn.weight": (1024,),
        "fuse_layer.aspp_modules.3.pointwise_conv.conv.weight": (256, 1024, 1, 1),
        "fuse_layer.aspp_modules.1.pointwise_conv.bn.num_batches_tracked": (),
        "fuse_layer.bottleneck.conv.weight": (256, 1024, 3, 3),
        "conv_seg.weight": (19, 256, 1, 1),
        "conv_seg.bias": (19,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert not any(k.endswith("conv.bias") for k in sd)  # a BN follows every unit's conv
    assert len([k for k in sd if k.startswith("fuse_layer.aspp_modules.")]) == 1 * 6 + 3 * 12


def test_layernorm_eps_and_drop_path_schedule() -> None:
    """§1.6-§1.7: eps 1e-6 on block/stage norms, 1e-5 on patch-embed and sr norms; linspace."""
    with torch.device("meta"):
        mit = build_mit("b5", drop_path_rate=0.1)
    for name, m in mit.named_modules():
        if isinstance(m, nn.LayerNorm):
            default_eps = name.startswith("patch_embed") or name.endswith("attn.norm")
            assert m.eps == (1e-5 if default_eps else 1e-6), name
    blocks = [b for i in range(1, 5) for b in getattr(mit, f"block{i}")]
    assert isinstance(blocks[0].drop_path, nn.Identity)
    probs = [b.drop_path.drop_prob for b in blocks[1:]]
    assert probs == pytest.approx([0.1 * k / 51 for k in range(1, 52)])


def test_random_init_rules(tiny: Segmentor) -> None:
    """§1.8 backbone init and §2.3 head init (only used when no checkpoint is given)."""
    mit, head = tiny.backbone, tiny.decode_head
    assert torch.all(mit.block3[0].attn.q.bias == 0)
    # upstream's trunc_normal_(std=0.02) truncates at +-2 absolute, i.e. practically a plain normal
    assert mit.block3[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(mit.norm2.weight == 1)
    assert torch.all(head.conv_seg.bias == 0)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.3)
    bn = head.fuse_layer.bottleneck.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    w = head.fuse_layer.bottleneck.conv.weight  # kaiming fan_out: std sqrt(2 / (out * k * k))
    assert w.std().item() == pytest.approx((2 / (w.shape[0] * 9)) ** 0.5, rel=0.1)


def test_attention_matches_explicit_formula() -> None:
    """§1.3 written out: q from x, [K | V] from the reduced map, softmax(QK^T/sqrt d)."""
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=2, sr_ratio=2).eval()
    x = torch.randn(2, 6 * 4, 32)  # (B, N, C) with H, W = 6, 4
    b, n, c, nh, hd = 2, 24, 32, 2, 16
    q = attn.q(x).reshape(b, n, nh, hd).transpose(1, 2)
    r = attn.norm(attn.sr(x.transpose(1, 2).reshape(b, c, 6, 4)).flatten(2).transpose(1, 2))
    k, v = attn.kv(r).split(c, dim=-1)
    k = k.reshape(b, -1, nh, hd).transpose(1, 2)
    v = v.reshape(b, -1, nh, hd).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-2, -1) * hd**-0.5, dim=-1)
    expected = attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(attn(x, 6, 4), expected, rtol=1e-5, atol=1e-5)


def test_shapes_non_square_and_finite(tiny: Segmentor) -> None:
    tiny.eval()
    x = torch.randn(2, 3, 64, 96)
    feats = tiny.features(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, TINY_DIMS[0], 16, 24),
        (2, TINY_DIMS[1], 8, 12),
        (2, TINY_DIMS[2], 4, 6),
        (2, TINY_DIMS[3], 2, 3),
    ]
    assert tiny.decode(feats).shape == (2, 19, 16, 24)
    out = tiny(x)
    assert out.shape == (2, 19, 64, 96)
    assert torch.isfinite(out).all()
    assert tiny.num_classes == 19


def test_every_parameter_gets_a_gradient(tiny: Segmentor) -> None:
    """timm's backward test: one train-mode step reaches every parameter with a finite grad."""
    tiny.train()
    x = torch.randn(2, 3, 64, 64)
    label = torch.randint(0, 19, (2, 64, 64))
    F.cross_entropy(tiny(x), label).backward()
    no_grad = [n for n, p in tiny.named_parameters() if p.grad is None]
    assert not no_grad
    assert all(torch.isfinite(p.grad).all() for p in tiny.parameters())


def test_segmentor_state_dict_is_only_backbone_and_head(tiny: Segmentor) -> None:
    assert all(k.startswith(("backbone.", "decode_head.")) for k in tiny.state_dict())


def test_head_built_from_the_backbone_widths() -> None:
    """A head factory (the config's `_partial_` node) gets in_channels = the backbone's dims."""
    with torch.device("meta"):
        seg = Segmentor(build_mit("b0"), partial(DAFormerHead, embed_dim=32, channels=32))
    assert seg.decode_head.in_channels == MIT_VARIANTS["b0"].embed_dims
    assert seg.num_classes == 19


@torch.no_grad()
def test_training_interface_is_one_view_and_one_prediction(tiny: Segmentor) -> None:
    """§3: the UDA loop's forward: the crop is the one view, its logits the one prediction."""
    tiny.eval()
    x = torch.randn(2, 3, 64, 64)
    (view,) = tiny.train_views(x)
    assert isinstance(view, View) and view.image is x and view.box is None
    (pred,) = tiny.decode_train([tiny.features(view.image)], [view])
    assert isinstance(pred, Prediction) and pred.weight == 1.0 and pred.box is None
    torch.testing.assert_close(pred.logits, tiny.decode(tiny.features(x)), rtol=0, atol=0)


class PixelwiseBackbone(nn.Module):
    """A full-resolution, per-pixel model: slide and whole inference must agree exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.tanh(self.conv(x))]


class PixelwiseHead(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv_seg = nn.Conv2d(8, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(feats[0])


def whole() -> Inference:
    return Inference("whole", resize=None)


def slide(crop_size: tuple[int, int], stride: tuple[int, int]) -> Inference:
    return Inference("slide", resize=None, crop_size=crop_size, stride=stride)


@torch.no_grad()
def test_slide_equals_whole_for_a_pixelwise_model() -> None:
    """Overlapping windows with a border-aligned last window: a wrong count map or a gap fails."""
    torch.manual_seed(0)
    model = Segmentor(PixelwiseBackbone(), PixelwiseHead()).eval()
    x = torch.randn(1, 3, 64, 96)
    by_whole = whole().logits(model, x)
    by_slide = slide(crop_size=(48, 40), stride=(20, 28)).logits(model, x)
    torch.testing.assert_close(by_slide, by_whole, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_slide_with_one_window_equals_whole(tiny: Segmentor) -> None:
    tiny.eval()
    x = torch.randn(1, 3, 64, 96)
    by_whole = whole().logits(tiny, x)
    torch.testing.assert_close(slide((64, 96), (32, 32)).logits(tiny, x), by_whole)
    # a crop larger than the image is clipped to it: still one window
    torch.testing.assert_close(slide((128, 128), (64, 64)).logits(tiny, x), by_whole)


@torch.no_grad()
def test_slide_averages_windows(tiny: Segmentor) -> None:
    """Two windows along W (0-64 and 32-96): overlap = mean, the rest = the single window."""
    tiny.eval()
    x = torch.randn(1, 3, 64, 96)
    left, right = tiny(x[..., :64]), tiny(x[..., 32:])
    by_slide = slide(crop_size=(64, 64), stride=(64, 48)).logits(tiny, x)
    torch.testing.assert_close(by_slide[..., :32], left[..., :32])
    torch.testing.assert_close(by_slide[..., 32:64], (left[..., 32:] + right[..., :32]) / 2)
    torch.testing.assert_close(by_slide[..., 64:], right[..., 32:])


def test_window_spans_cover_the_axis_and_end_flush() -> None:
    """§3.2: windows every `stride` px, the last moved back to end at the border; crops clipped."""
    assert window_spans(96, 64, 48) == [(0, 64), (32, 96)]
    assert window_spans(64, 128, 64) == [(0, 64)]
    assert window_spans(64, 64, 32) == [(0, 64)]
    for length, crop, stride in ((64, 48, 20), (96, 40, 28), (100, 43, 43), (512, 512, 341)):
        spans = window_spans(length, crop, stride)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(end - start == min(crop, length) for start, end in spans)
        assert all(b[0] <= a[1] for a, b in pairwise(spans))  # no gap


@torch.no_grad()
def test_inference_upsamples_in_two_steps(tiny: Segmentor) -> None:
    """§3.2: stride-4 logits -> input size -> original size, not one direct resize."""
    tiny.eval()
    x = torch.randn(1, 3, 64, 96)
    out = Inference().logits(tiny, x, out_size=(150, 200))
    assert out.shape == (1, 19, 150, 200)
    low = tiny.decode(tiny.features(x))
    up = bilinear(bilinear(low, (64, 96)), (150, 200))
    torch.testing.assert_close(out, up)
    assert not torch.allclose(out, bilinear(low, (150, 200)), atol=1e-6)
    with pytest.raises(ValueError, match="unknown inference mode"):
        Inference(mode="sliding")


def test_inference_settings_are_checked_and_shown() -> None:
    """The defaults are the paper's protocol (§3.2); a bad setting fails at construction."""
    paper = Inference()
    assert (paper.mode, paper.resize) == ("whole", (1024, 512))
    assert (paper.crop_size, paper.stride) == ((512, 512), (341, 341))
    assert repr(paper) == "Inference(mode='whole', resize=(1024, 512))"
    assert Inference(resize=None).resize is None
    assert "crop_size=(64, 64), stride=(43, 43)" in repr(
        Inference("slide", None, [64, 64], [43, 43])
    )
    with pytest.raises(ConfigError, match=r"inference.resize=\[128\] must be two positive"):
        Inference(resize=[128])
    with pytest.raises(ConfigError, match=r"inference\.stride\[0\]=0 must be an integer >= 1"):
        Inference(stride=(0, 43))


def bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_build_mit_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match="unknown MiT variant 'b6'"):
        build_mit("b6")
