"""The opt-in SAM feature cache (issue 4): geometry, build/resume, and training from it.

Tiny SAM (random weights) on the tiny synthetic dataset of conftest; every test is CPU-sized.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssr import CONF_DIR
from ssr import sam_cache as cli
from ssr.data.datamodule import UDADataModule
from ssr.data.datasets import read_image
from ssr.data.transforms import test_transform
from ssr.sam_cache import build_cache, encode_full, tile_origins
from ssr.train import build_module
from ssr.uda.sam import SamCacheError, SamRegularizer, cache_file, crop_features


def _compose(config: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(config, overrides=overrides)


def _data(root: Path) -> list[str]:
    return [
        f"data.source_root={root / 'gta'}",
        f"data.target_root={root / 'cityscapes'}",
        "data.num_workers=0",
        "data.rcs.min_pixels=10",
        "data.batch_size=2",
    ]


def _sam(cache_dir: Path | None = None) -> SamRegularizer:
    """demo_ssr's regulariser, built directly so its own errors are not wrapped by Hydra."""
    cfg = OmegaConf.to_container(_compose("train", ["experiment=demo_ssr"]).uda.sam)
    del cfg["_target_"]
    return SamRegularizer(**cfg | {"cache_dir": cache_dir})


@pytest.fixture(scope="module")
def cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete float32 cache of the synthetic data, built through the CLI's own config."""
    out = tmp_path_factory.mktemp("sam_cache")
    cfg = _compose("sam_cache", ["experiment=demo_ssr", *_data(synthetic_root), f"out={out}"])
    cfg.dtype = "float32"  # exact features: the comparisons below are then float32-tight
    summary = build_cache(cfg)
    assert summary["complete"] and summary["source"]["encoded"] == 8
    assert summary["target"]["encoded"] == 4
    return out


def _datamodule(root: Path) -> UDADataModule:
    cfg = _compose("train", ["experiment=demo_ssr", *_data(root)])
    dm = instantiate(cfg.data, crop_info=True, seed=0)
    dm.setup("fit")
    dm.train_set.crop_info = True
    return dm


def test_tiles_cover_the_image_on_token_boundaries() -> None:
    assert tile_origins(64, 64, 64) == [0]
    assert tile_origins(40, 64, 64) == [0]  # smaller than a crop: one padded tile
    assert tile_origins(88, 64, 64) == [0, 24]  # last tile flush with the end
    assert tile_origins(160, 64, 32) == [0, 32, 64, 96]
    assert tile_origins(704, 512, 512) == [0, 192] and tile_origins(1280, 512, 512)[-1] == 768


def test_crop_features_cut_flip_and_interpolate() -> None:
    full = torch.arange(2 * 6 * 10, dtype=torch.float32).reshape(2, 6, 10)
    cut = crop_features(full, 8, 16, False, (4, 4), (8, 8))  # offset = 1 token down, 2 right
    torch.testing.assert_close(cut, full[:, 1:5, 2:6])
    torch.testing.assert_close(crop_features(full, 8, 16, True, (4, 4), (8, 8)), cut.flip(-1))
    half = crop_features(full.numpy(), 0, 4, False, (4, 4), (8, 8))  # half a token to the right
    torch.testing.assert_close(half, 0.5 * (full[:, :4, :4] + full[:, :4, 1:5]))


def test_full_map_equals_online_features_where_tiles_are_crops() -> None:
    """Each tile goes through SAM exactly like an online crop: on tile positions, no difference."""
    sam = _sam()
    image = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(0))
    full = encode_full(sam, image, (64, 64))  # tiles at x = 0 and 64, no overlap
    assert full.shape == (sam.sam_dim, 8, 16)
    for left in (0, 64):
        online = sam.encode(image[None, :, :, left : left + 64])[0]
        torch.testing.assert_close(crop_features(full, 0, left, False, (8, 8), (8, 8)), online)


def test_recorded_crop_box_reproduces_the_pixel_crop(synthetic_root: Path) -> None:
    """src_crop / tgt_crop say exactly where the student's crop lies in the resized image."""
    dm = _datamodule(synthetic_root)
    flips = set()
    for i in range(6):
        item = dm.train_set[i]
        for prefix, ds, resize in (
            ("src", dm.train_set.source, dm.source_resize),
            ("tgt", dm.train_set.target, dm.target_resize),
        ):
            height, width, top, left, flip = item[f"{prefix}_crop"].tolist()
            index = [p.relative_to(ds.root).as_posix() for p in ds.images].index(
                item[f"{prefix}_file"]
            )
            full = ds.make_item(index, read_image(ds.images[index]), None, test_transform(resize))
            assert tuple(full["img"].shape[-2:]) == (height, width)
            pixels = full["img"][:, top : top + 64, left : left + 64]
            torch.testing.assert_close(item[f"{prefix}_img"], pixels.flip(-1) if flip else pixels)
            flips.add(flip)
    assert flips == {0, 1}


def test_cached_crops_match_online_on_tile_positions(synthetic_root: Path, cache: Path) -> None:
    sam = _sam(cache)
    dm = _datamodule(synthetic_root)
    ds = dm.train_set.target
    name = ds.images[0].relative_to(ds.root).as_posix()
    image = ds.make_item(0, read_image(ds.images[0]), None, test_transform(dm.target_resize))["img"]
    crops = torch.tensor([[64, 128, 0, 64, 0], [64, 128, 0, 64, 1], [64, 128, 0, 20, 0]])
    got = sam.cache.crops("target", [name] * 3, crops, (64, 64))
    torch.testing.assert_close(got[0], sam.encode(image[None, :, :, 64:128])[0])
    torch.testing.assert_close(got[1], got[0].flip(-1))  # SAM sees the flip only as a flip
    full = torch.from_numpy(np.load(cache_file(cache, "target", name)))
    torch.testing.assert_close(got[2], crop_features(full, 0, 20, False, (8, 8), (8, 8)))


def test_mixed_features_follow_the_classmix_mask(synthetic_root: Path, cache: Path) -> None:
    sam = _sam(cache)
    dm = _datamodule(synthetic_root)
    batch = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=2, sampler=[0, 1])))
    xs, xt = batch["src_img"], batch["tgt_img"]
    ones = torch.ones(2, 1, 64, 64)
    s_src, s_mix = sam.step_features(xs, xs, ones, batch)
    torch.testing.assert_close(s_mix, s_src)
    s_src, s_tgt = sam.step_features(xs, xt, ones * 0, batch)
    half = ones.clone()
    half[..., 32:] = 0  # left half source, right half target: token columns 0-3 vs 4-7
    _, s_mix = sam.step_features(xs, xs, half, batch)
    torch.testing.assert_close(s_mix[..., :4], s_src[..., :4])
    torch.testing.assert_close(s_mix[..., 4:], s_tgt[..., 4:])
    with pytest.raises(SamCacheError, match="crop_info"):
        sam.step_features(xs, xs, ones, {"src_img": xs})


def test_training_from_the_cache_asks_the_datamodule_for_crops(
    synthetic_root: Path, cache: Path
) -> None:
    cfg = _compose(
        "train", ["experiment=demo_ssr", *_data(synthetic_root), f"uda.sam.cache_dir={cache}"]
    )
    module = build_module(cfg)
    datamodule = instantiate(cfg.data, seed=0)
    assert not datamodule.crop_info
    encoder_calls = []
    module.sam.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert datamodule.crop_info and not encoder_calls  # SAM never ran online
    for p in module.sam.trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert torch.isfinite(trainer.callback_metrics["train/ssr_mix_ce"])


def test_resume_encodes_only_what_is_missing(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = _compose("sam_cache", ["experiment=demo_ssr", *_data(synthetic_root), f"out={out}"])
    cfg.domains = ["target"]
    first = build_cache(cfg)
    assert first["target"]["encoded"] == 4 and not first["complete"]  # source still missing
    files = sorted((out / "target").rglob("*.npy"))
    kept = np.load(files[1])
    files[0].unlink()
    (files[0].parent / "half_written.npy.123.tmp").write_bytes(b"x")
    again = build_cache(cfg)
    assert again["target"]["encoded"] == 1 and files[0].is_file()
    assert not list(out.rglob("*.tmp"))
    np.testing.assert_array_equal(np.load(files[1]), kept)
    assert np.load(files[0]).dtype == np.float16
    with pytest.raises(SamCacheError, match="incomplete"):
        _sam(out)
    cfg.dtype = "float32"
    with pytest.raises(SamCacheError, match="dtype='float16'"):
        build_cache(cfg)


def test_a_cache_that_does_not_fit_is_refused(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(SamCacheError, match=r"python -m ssr\.sam_cache"):
        _sam(tmp_path / "nothing")
    manifest = json.loads((cache / "manifest.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    with pytest.raises(SamCacheError, match="another SAM encoder"):
        _sam(other)
    sam = _sam(cache)
    crops = torch.tensor([[64, 128, 0, 0, 0]])
    with pytest.raises(SamCacheError, match="built for"):
        sam.cache.crops("target", ["x.png"], crops, (32, 32))
    with pytest.raises(SamCacheError, match="no cached SAM features"):
        sam.cache.crops("target", ["missing/x.png"], crops, (64, 64))
    name = next((cache / "target").rglob("*.npy")).relative_to(cache / "target")
    with pytest.raises(SamCacheError, match="another data"):
        sam.cache.crops("target", [name.as_posix()], torch.tensor([[64, 256, 0, 0, 0]]), (64, 64))


def test_cli_without_sam_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    argv = ["prog", "experiment=demo_daformer", f"out={tmp_path}", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uda.sam is null" in err[0]
