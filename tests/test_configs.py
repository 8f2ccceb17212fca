"""Every experiment composes and builds; group configs instantiate; the SSR stage sweep parses."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssr import CONF_MODULE
from ssr.data.datamodule import UDADataModule
from ssr.model.hrda import HRDASegmentor
from ssr.model.inference import Inference
from ssr.model.mit import MIT_VARIANTS
from ssr.model.segmentor import Segmentor
from ssr.run.cli import user_error
from ssr.train import build_module
from ssr.uda.fd import FeatureDistanceConfigError
from ssr.uda.module import UDAModule

from helpers import compose_cfg


def config_names(group: str) -> list[str]:
    """The configs of a group, from the package (src/ssr/conf), as an installed wheel has them."""
    folder = files(CONF_MODULE) / group
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


EXPERIMENTS = config_names("experiment")
# The further benchmarks: a base experiment (daformer, mic_hrda, ...) with another data pair.
BENCHMARK = [
    e for e in EXPERIMENTS if e.endswith(("_synthia", "_acdc", "_darkzurich")) and "demo" not in e
]
BUILT = [e for e in EXPERIMENTS if e not in BENCHMARK]  # a benchmark builds as its base does
PAPER = ["source_only", "daformer", "mic", "ssr", "mic_ssr"]
MODELS = [f"daformer_mitb{i}" for i in range(6)]
# Parameters of the network that ships (the student segmentor), docs/method.md §1-§2.
SHIPPED = {"b5": 85_155_283, "tiny": 551_267}
# HRDA adds the scale-attention head (docs/hrda.md §3.1: 530,707 at paper width).
SCALE_ATTENTION = {"b5": 530_707, "tiny": 13_107}
# SSR's trainable projection + fusion layers (§6.9) and the frozen SAM encoders.
SSR_TRAINABLE = {"b5": 1_804_288, "tiny": 104_960}
SAM_ENCODER = {"vit_b": 89_670_912, "tiny": 63_136}


def n_params(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def test_paper_and_demo_experiments_exist() -> None:
    assert set(PAPER) <= set(EXPERIMENTS)
    assert {"demo", "demo_daformer", "demo_mic", "demo_ssr", "demo_mic_ssr"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_datamodule(name: str) -> None:
    cfg = compose_cfg("train", f"experiment={name}", "paths.data_dir=/nonexistent")
    assert cfg.uda._target_ == "ssr.uda.module.UDAModule"
    dm = instantiate(cfg.data)  # no file access before setup()
    assert isinstance(dm, UDADataModule)
    assert OmegaConf.select(cfg, "trainer.max_steps") > 0
    if cfg.model._target_.endswith("HRDASegmentor"):  # HRDA tests at full resolution
        assert cfg.data.test_resize is None
    else:
        assert list(cfg.data.test_resize) == list(cfg.inference.resize)  # one test scale


def random_weights(name: str, *overrides: str) -> DictConfig:
    """`experiment=name` with every pretrained file replaced by random weights."""
    cfg = compose_cfg("train", f"experiment={name}")
    random = ["model.backbone.pretrained=null"]
    if cfg.uda.fd is not None:  # FD preserves ImageNet features: without them there are none
        random.append("uda.fd=null")
    if cfg.uda.sam is not None:
        random.append("uda.sam.encoder.checkpoint=null")  # random SAM
    return compose_cfg("train", f"experiment={name}", *random, *overrides)


@pytest.mark.parametrize("name", BUILT)
def test_experiment_builds_its_uda_module(name: str) -> None:
    """The full module of every experiment, with random weights; paper-scale ones on the meta
    device (shapes and counts without allocating up to ~260 M parameters)."""
    cfg = random_weights(name)
    variant = cfg.model.backbone.variant
    with torch.device("cpu" if variant == "tiny" else "meta"):
        module = build_module(cfg)
    hrda = isinstance(module.model, HRDASegmentor)
    assert isinstance(module, UDAModule) and (hrda or isinstance(module.model, Segmentor))
    shipped = SHIPPED[variant] + (SCALE_ATTENTION[variant] if hrda else 0)
    assert n_params(module.model) == shipped
    assert module.model_config == OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(module.inference, Inference)
    # HRDA brings its own test protocol: full resolution, windows of the training crop.
    expected = None if hrda else tuple(cfg.inference.resize)
    assert module.inference.resize == expected
    uda = cfg.uda
    assert (module.teacher is None) == (uda.teacher is None) == (module.mixing is None)
    assert (module.masking is None) == (uda.masking is None)
    assert (module.sam is None) == (uda.sam is None)
    assert module.fd is None  # no ImageNet weights here
    if module.teacher is not None:
        assert module.teacher.alpha == uda.teacher.alpha
        assert not any(p.requires_grad for p in module.teacher.parameters())
        assert module.mixing.seed == cfg.seed  # uda.mixing.seed: ${seed}
    trainable = n_params(module, trainable=True)
    if module.sam is None:
        assert trainable == shipped
    else:
        sam_variant = uda.sam.encoder.variant
        assert module.sam.encoder.variant == sam_variant
        assert n_params(module.sam.encoder) == SAM_ENCODER[sam_variant]
        assert not any(p.requires_grad for p in module.sam.encoder.parameters())  # frozen SAM
        assert n_params(module.sam, trainable=True) == SSR_TRAINABLE[variant]
        assert trainable == shipped + SSR_TRAINABLE[variant]
        assert module.sam.stages == (0, 1, 2, 3)
        assert not any(k.startswith("sam.encoder.") for k in module.state_dict())


def test_every_benchmark_has_its_four_methods() -> None:
    for pair in ("synthia", "acdc", "darkzurich"):
        methods = {e.removesuffix(f"_{pair}") for e in BENCHMARK if e.endswith(f"_{pair}")}
        assert {"daformer", "mic", "ssr", "mic_ssr"} <= methods
    hrda = {e for e in BENCHMARK if "hrda" in e}
    assert hrda == {f"{m}_synthia" for m in ("hrda", "mic_hrda", "ssr_hrda", "mic_ssr_hrda")}


@pytest.mark.parametrize("name", BENCHMARK)
def test_benchmark_experiment_changes_only_its_data_and_documented_settings(name: str) -> None:
    """docs/benchmarks.md: the GTA5 settings of the base experiment, the pair's data, and for
    ACDC / Dark Zurich the 960x540 test scale and MIC's choices (no PL crop, mask mode separate)."""
    base_name, _, pair = name.rpartition("_")
    base = compose_cfg("train", f"experiment={base_name}")
    cfg = compose_cfg("train", f"experiment={name}")
    for key in ("model", "optim", "trainer"):
        assert cfg[key] == base[key], key
    assert cfg.data.crop_size == base.data.crop_size and cfg.data.rcs == base.data.rcs
    uda = OmegaConf.to_container(base.uda)
    hr = "hrda" in name
    if pair == "synthia":
        assert (cfg.data.source_format, cfg.data.eval_subsets) == ("synthia", "synthia")
        assert list(cfg.data.source_resize) == ([2560, 1520] if hr else [1280, 760])
        assert cfg.inference == base.inference
    else:
        assert (cfg.data.source_format, cfg.data.target_format) == ("cityscapes", pair)
        assert list(cfg.data.source_resize) == [1024, 512]
        assert list(cfg.data.target_resize) == list(cfg.inference.resize) == [960, 540]
        if base.uda.masking is not None:
            uda["teacher"]["ignore_top"] = uda["teacher"]["ignore_bottom"] = 0
            uda["masking"]["mode"] = "separate"
    assert OmegaConf.to_container(cfg.uda) == uda


def test_fd_without_imagenet_weights_is_a_user_error() -> None:
    """Why the builds above set uda.fd=null: FD preserves ImageNet features (§4.8)."""
    cfg = compose_cfg("train", "experiment=daformer", "model.backbone.pretrained=null")
    with pytest.raises(InstantiationException) as err, torch.device("meta"):
        build_module(cfg)
    assert isinstance(err.value.__cause__, FeatureDistanceConfigError)
    message = user_error(err.value)  # what the CLI prints, unwrapped from Hydra's exception
    assert message is not None and "set uda.fd=null" in message and "\n" not in message


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiments_keep_the_paper_defaults(name: str) -> None:
    cfg = compose_cfg("train", f"experiment={name}")
    assert cfg.model.backbone.variant == "b5"
    assert cfg.model.backbone.pretrained.endswith("mit_b5.pth")
    assert cfg.data.crop_size == [512, 512] and cfg.data.batch_size == 2
    assert cfg.optim.lr == 6e-5 and cfg.optim.head_lr_mult == 10 and cfg.optim.warmup_steps == 1500
    assert cfg.trainer.max_steps == 40000 and cfg.trainer.val_check_interval == 4000
    assert cfg.inference.mode == "whole" and list(cfg.inference.resize) == [1024, 512]
    self_training = name != "source_only"
    assert (cfg.uda.teacher is not None) is self_training
    assert (cfg.uda.mixing is not None) is self_training
    if self_training:
        assert cfg.uda.teacher.alpha == 0.999 and cfg.uda.teacher.threshold == 0.968
        assert cfg.uda.fd.weight == 0.005 and cfg.data.rcs.temperature == 0.01
        assert (cfg.uda.teacher.ignore_top, cfg.uda.teacher.ignore_bottom) == (15, 120)
    else:
        assert cfg.uda.fd is None
    assert (cfg.uda.masking is not None) == name.startswith("mic")
    if cfg.uda.masking is not None:
        assert (cfg.uda.masking.block_size, cfg.uda.masking.ratio) == (32, 0.7)
    sam = cfg.uda.get("sam")
    assert (sam is not None) == name.endswith("ssr")
    if sam is not None:
        assert sam.encoder.variant == "vit_b" and list(sam.stages) == [0, 1, 2, 3]
        assert sam.encoder.checkpoint.endswith("sam_vit_b_01ec64.pth")


@pytest.mark.parametrize("model", [m for m in config_names("model") if "tiny" in m])
def test_tiny_model_config_instantiates(model: str) -> None:
    cfg = compose_cfg("train", f"model={model}")
    seg = instantiate(cfg.model)
    assert isinstance(seg, HRDASegmentor if model.startswith("hrda") else Segmentor)
    assert seg(torch.zeros(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def test_mit_variants_share_one_head_config() -> None:
    """`model=daformer_mitbX` selects the backbone only: one head config, whose input channels
    come from the backbone; `model.backbone.variant=...` is the same selection."""
    cfgs = {m: compose_cfg("train", f"model={m}").model for m in MODELS}
    heads = {m: OmegaConf.to_container(c.decode_head) for m, c in cfgs.items()}
    assert all(h == heads["daformer_mitb5"] for h in heads.values())
    assert "in_channels" not in heads["daformer_mitb5"]
    for m, cfg in cfgs.items():
        variant = m.removeprefix("daformer_mit")
        assert cfg.backbone.variant == variant
        assert cfg.backbone.pretrained.endswith(f"mit_{variant}.pth")
        with torch.device("meta"):
            seg = instantiate(cfg, backbone={"pretrained": None})
        assert seg.decode_head.in_channels == MIT_VARIANTS[variant].embed_dims
        assert seg.backbone.embed_dims == MIT_VARIANTS[variant].embed_dims
    direct = compose_cfg("train", "model=daformer", "model.backbone.variant=b3").model
    assert direct == cfgs["daformer_mitb3"]
    assert direct.backbone.pretrained.endswith("mit_b3.pth")
    with torch.device("meta"):
        seg = instantiate(direct, backbone={"pretrained": None})
    assert len(seg.backbone.block3) == MIT_VARIANTS["b3"].depths[2] == 18


def test_ssr_stage_sweep_composes_every_choice() -> None:
    full = compose_cfg("train", "experiment=ssr", "sweep=ssr_stages", hydra=True)
    spec = full.hydra.sweeper.params["uda.sam.stages"]
    (override,) = OverridesParser.create().parse_overrides([f"uda.sam.stages={spec}"])
    choices = [list(v) for v in override.sweep_iterator()]
    assert choices == [[], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]  # SSR paper Table I rows
    for stages in choices:
        value = "[" + ",".join(map(str, stages)) + "]"
        cfg = compose_cfg("train", "experiment=ssr", f"uda.sam.stages={value}")
        assert list(cfg.uda.sam.stages) == stages


@pytest.mark.parametrize(("stages", "fused"), [("[]", None), ("[2,3]", (2, 3))])
def test_stage_sweep_rows_build(stages: str, fused: tuple[int, ...] | None) -> None:
    """Table I's first row (no stage) is plain DAFormer: no SAM at all; the others fuse theirs."""
    cfg = random_weights("ssr", f"uda.sam.stages={stages}")
    with torch.device("meta"):
        module = build_module(cfg)
    if fused is None:
        assert module.sam is None
        assert n_params(module, trainable=True) == SHIPPED["b5"]
    else:
        assert module.sam.stages == fused
        trainable = {
            ".".join(n.split(".")[:2]) for n, p in module.sam.named_parameters() if p.requires_grad
        }
        assert trainable == {
            f"{layer}.{i}" for layer in ("embedding_layer", "fusion_layer") for i in fused
        }
