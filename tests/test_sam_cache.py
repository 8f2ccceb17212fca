"""The opt-in SAM feature cache: geometry, build/resume, and training from it.

Tiny SAM (random weights) on the tiny synthetic dataset of conftest; every test is CPU-sized.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssr.data.datamodule import UDADataModule
from ssr.data.datasets import read_image
from ssr.data.transforms import test_transform
from ssr.train import build_module
from ssr.uda import sam_cache
from ssr.uda.mixing import MixedBatch
from ssr.uda.sam_cache import build_cache, encode_full, tile_origins
from ssr.uda.sam_encoder import SamEncoder
from ssr.uda.sam_features import CachedSamFeatures, SamCacheError, cache_file, crop_features
from ssr.uda.ssr import SSRRegularizer

from helpers import call_hydra_main, compose_cfg, cpu_trainer, synthetic_train


@pytest.fixture(scope="module")
def demo_ssr() -> DictConfig:
    """experiment=demo_ssr as composed for training (data roots left at their defaults)."""
    return compose_cfg("train", "experiment=demo_ssr")


@pytest.fixture(scope="module")
def encoder(demo_ssr: DictConfig) -> SamEncoder:
    """demo_ssr's frozen tiny SAM encoder."""
    return instantiate(demo_ssr.uda.sam.encoder)


def regularizer(cfg: DictConfig, cache_dir: Path) -> SSRRegularizer:
    """demo_ssr's regulariser reading the cache, for the tiny MiT's stage widths."""
    return instantiate(cfg.uda.sam, cache_dir=str(cache_dir))(
        stage_dims=[16, 32, 80, 128], stage_heads=[1, 2, 5, 8]
    )


def mixed_batch(image: torch.Tensor, mask: torch.Tensor) -> MixedBatch:
    """A mixed step's inputs with the given ClassMix mask (the cache reads only the mask)."""
    b, _, h, w = image.shape
    return MixedBatch(image, torch.zeros(b, h, w, dtype=torch.long), torch.ones(b, h, w), mask)


@pytest.fixture(scope="module")
def cache(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete float32 cache of the synthetic data, built through the CLI's own config."""
    out = tmp_path_factory.mktemp("sam_cache")
    cfg = compose_cfg(
        "sam_cache", "experiment=demo_ssr", *synthetic_train(synthetic_root), f"out={out}"
    )
    cfg.dtype = "float32"  # exact features: the comparisons below are then float32-tight
    summary = build_cache(cfg)
    assert summary["complete"] and summary["source"]["encoded"] == 8
    assert summary["target"]["encoded"] == 4
    return out


def _datamodule(root: Path) -> UDADataModule:
    cfg = compose_cfg("train", "experiment=demo_ssr", *synthetic_train(root))
    dm = instantiate(cfg.data, seed=0)
    dm.setup("fit")
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


def test_full_map_equals_online_features_where_tiles_are_crops(encoder: SamEncoder) -> None:
    """Each tile goes through SAM exactly like an online crop: on tile positions, no difference."""
    image = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(0))
    full = encode_full(encoder, image, (64, 64))  # tiles at x = 0 and 64, no overlap
    assert full.shape == (encoder.dim, 8, 16)
    for left in (0, 64):
        online = encoder(image[None, :, :, left : left + 64])[0]
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
            crop = item[f"{prefix}_crop"]
            height, width, top, left, flip = crop.box.tolist()
            index = [p.relative_to(ds.root).as_posix() for p in ds.images].index(crop.file)
            full = ds.make_item(index, read_image(ds.images[index]), None, test_transform(resize))
            assert tuple(full["img"].shape[-2:]) == (height, width)
            pixels = full["img"][:, top : top + 64, left : left + 64]
            torch.testing.assert_close(item[f"{prefix}_img"], pixels.flip(-1) if flip else pixels)
            flips.add(flip)
    assert flips == {0, 1}


def test_cached_crops_match_online_on_tile_positions(
    synthetic_root: Path, cache: Path, encoder: SamEncoder
) -> None:
    features = CachedSamFeatures(cache, encoder)
    dm = _datamodule(synthetic_root)
    ds = dm.train_set.target
    name = ds.images[0].relative_to(ds.root).as_posix()
    image = ds.make_item(0, read_image(ds.images[0]), None, test_transform(dm.target_resize))["img"]
    crops = torch.tensor([[64, 128, 0, 64, 0], [64, 128, 0, 64, 1], [64, 128, 0, 20, 0]])
    got = features.crops("target", [name] * 3, crops, (64, 64))
    torch.testing.assert_close(got[0], encoder(image[None, :, :, 64:128])[0])
    torch.testing.assert_close(got[1], got[0].flip(-1))  # SAM sees the flip only as a flip
    full = torch.from_numpy(np.load(cache_file(cache, "target", name)))
    torch.testing.assert_close(got[2], crop_features(full, 0, 20, False, (8, 8), (8, 8)))


def test_mixed_features_follow_the_classmix_mask(
    synthetic_root: Path, cache: Path, demo_ssr: DictConfig
) -> None:
    sam = regularizer(demo_ssr, cache)
    assert isinstance(sam.source, CachedSamFeatures)
    dm = _datamodule(synthetic_root)
    batch = next(iter(torch.utils.data.DataLoader(dm.train_set, batch_size=2, sampler=[0, 1])))
    xs, xt = batch["src_img"], batch["tgt_img"]
    crops = (batch["src_crop"], batch["tgt_crop"])
    ones = torch.ones(2, 1, 64, 64)
    s_src, s_mix = sam.step_features(xs, mixed_batch(xs, ones), *crops)
    torch.testing.assert_close(s_mix, s_src)
    s_src, s_tgt = sam.step_features(xs, mixed_batch(xt, ones * 0), *crops)
    half = ones.clone()
    half[..., 32:] = 0  # left half source, right half target: token columns 0-3 vs 4-7
    _, s_mix = sam.step_features(xs, mixed_batch(xs, half), *crops)
    torch.testing.assert_close(s_mix[..., :4], s_src[..., :4])
    torch.testing.assert_close(s_mix[..., 4:], s_tgt[..., 4:])


def test_training_from_the_cache_never_runs_sam_online(synthetic_root: Path, cache: Path) -> None:
    cfg = compose_cfg(
        "train",
        "experiment=demo_ssr",
        *synthetic_train(synthetic_root),
        f"uda.sam.cache_dir={cache}",
    )
    module = build_module(cfg)
    assert isinstance(module.sam.source, CachedSamFeatures)
    datamodule = instantiate(cfg.data, seed=0)
    encoder_calls = []
    module.sam.encoder.encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    trainer = cpu_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1 and not encoder_calls  # SAM never ran online
    for _, p in module.sam.named_trainable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert torch.isfinite(trainer.callback_metrics["train/ssr_mix_ce"])


def test_resume_encodes_only_what_is_missing(
    synthetic_root: Path, tmp_path: Path, encoder: SamEncoder
) -> None:
    out = tmp_path / "c"
    cfg = compose_cfg(
        "sam_cache", "experiment=demo_ssr", *synthetic_train(synthetic_root), f"out={out}"
    )
    cfg.domains = ["target"]
    first = build_cache(cfg)
    assert first["target"]["encoded"] == 4 and not first["complete"]  # source still missing
    files = sorted((out / "target").rglob("*.npy"))
    kept = np.load(files[1])
    files[0].unlink()
    dead_pid = 2**31 - 1  # no such process: the writer of this temporary file was killed
    (files[0].parent / f".{files[0].name}.{dead_pid}.0123abcd.tmp").write_bytes(b"x")
    again = build_cache(cfg)
    assert again["target"]["encoded"] == 1 and files[0].is_file()
    assert not list(out.rglob("*.tmp"))
    np.testing.assert_array_equal(np.load(files[1]), kept)
    assert np.load(files[0]).dtype == np.float16
    with pytest.raises(SamCacheError, match="incomplete"):
        CachedSamFeatures(out, encoder)
    cfg.dtype = "float32"
    with pytest.raises(SamCacheError, match="dtype='float16'"):
        build_cache(cfg)


def test_a_cache_that_does_not_fit_is_refused(
    cache: Path, tmp_path: Path, encoder: SamEncoder
) -> None:
    with pytest.raises(SamCacheError, match=r"python -m ssr\.uda\.sam_cache"):
        CachedSamFeatures(tmp_path / "nothing", encoder)
    manifest = json.loads((cache / "manifest.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    with pytest.raises(SamCacheError, match="another SAM encoder"):
        CachedSamFeatures(other, encoder)
    with pytest.raises(SamCacheError, match="another SAM encoder"):  # same tiny shape, other seed
        CachedSamFeatures(cache, SamEncoder("tiny", seed=1))
    features = CachedSamFeatures(cache, encoder)
    crops = torch.tensor([[64, 128, 0, 0, 0]])
    with pytest.raises(SamCacheError, match="built for"):
        features.crops("target", ["x.png"], crops, (32, 32))
    with pytest.raises(SamCacheError, match="no cached SAM features"):
        features.crops("target", ["missing/x.png"], crops, (64, 64))
    name = next((cache / "target").rglob("*.npy")).relative_to(cache / "target")
    with pytest.raises(SamCacheError, match="another data"):
        features.crops("target", [name.as_posix()], torch.tensor([[64, 256, 0, 0, 0]]), (64, 64))


def test_cli_without_sam_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    overrides = ["experiment=demo_daformer", f"out={tmp_path}"]
    assert call_hydra_main(sam_cache.main, monkeypatch, tmp_path, overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "uda.sam is null" in err[0]
