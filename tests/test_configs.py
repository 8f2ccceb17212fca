"""Every experiment composes; group configs instantiate; the SSR stage sweep parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssr.data.datamodule import UDADataModule
from ssr.model.segmentor import Segmentor

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PAPER = ["source_only", "daformer", "mic", "ssr", "mic_ssr"]


def compose_train(*overrides: str) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_paper_and_demo_experiments_exist() -> None:
    assert set(PAPER) <= set(EXPERIMENTS)
    assert {"demo", "demo_daformer", "demo_mic", "demo_ssr", "demo_mic_ssr"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_datamodule(name: str) -> None:
    cfg = compose_train(f"experiment={name}", "paths.data_dir=/nonexistent")
    assert cfg.uda._target_ == "ssr.uda.module.UDAModule"
    dm = instantiate(cfg.data)  # no file access before setup()
    assert isinstance(dm, UDADataModule)
    assert OmegaConf.select(cfg, "trainer.max_steps") > 0


@pytest.mark.parametrize("name", PAPER)
def test_paper_experiments_keep_the_paper_defaults(name: str) -> None:
    cfg = compose_train(f"experiment={name}")
    assert cfg.model.backbone.variant == "b5"
    assert cfg.model.backbone.pretrained.endswith("mit_b5.pth")
    assert cfg.data.crop_size == [512, 512] and cfg.data.batch_size == 2
    assert cfg.optim.lr == 6e-5 and cfg.optim.head_lr_mult == 10 and cfg.optim.warmup_steps == 1500
    assert cfg.trainer.max_steps == 40000 and cfg.trainer.val_check_interval == 4000
    self_training = name != "source_only"
    assert cfg.uda.self_training is self_training
    if self_training:
        assert cfg.uda.alpha == 0.999 and cfg.uda.pseudo_threshold == 0.968
        assert cfg.uda.fd_weight == 0.005 and cfg.data.rcs.temperature == 0.01
        assert (cfg.uda.pl_ignore_top, cfg.uda.pl_ignore_bottom) == (15, 120)
    assert (cfg.uda.masking is not None) == name.startswith("mic")
    if cfg.uda.masking is not None:
        assert (cfg.uda.masking.block_size, cfg.uda.masking.ratio) == (32, 0.7)
    sam = cfg.uda.get("sam")
    assert (sam is not None) == name.endswith("ssr")
    if sam is not None:
        assert sam.variant == "vit_b" and list(sam.stages) == [0, 1, 2, 3]
        assert sam.checkpoint.endswith("sam_vit_b_01ec64.pth")


@pytest.mark.parametrize(
    "model", sorted(p.stem for p in (CONF / "model").glob("*.yaml") if "tiny" in p.stem)
)
def test_tiny_model_config_instantiates(model: str) -> None:
    cfg = compose_train(f"model={model}")
    seg = instantiate(cfg.model)
    assert isinstance(seg, Segmentor)
    assert seg(torch.zeros(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def test_ssr_stage_sweep_composes_every_choice() -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        full = compose("train", overrides=["experiment=ssr", "sweep=ssr_stages"],
                       return_hydra_config=True)  # fmt: skip
    spec = full.hydra.sweeper.params["uda.sam.stages"]
    (override,) = OverridesParser.create().parse_overrides([f"uda.sam.stages={spec}"])
    choices = [list(v) for v in override.sweep_iterator()]
    assert choices == [[], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]  # SSR paper Table I rows
    for stages in choices:
        value = "[" + ",".join(map(str, stages)) + "]"
        cfg = compose_train("experiment=ssr", f"uda.sam.stages={value}")
        assert list(cfg.uda.sam.stages) == stages
