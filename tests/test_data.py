"""Datasets on tiny trees and the UDA datamodule (docs/method.md §4.1, §4.2, §7)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from ssr.data import prepare
from ssr.data import transforms as T
from ssr.data.datamodule import UDADataModule
from ssr.data.datasets import CityscapesDataset, DatasetError, GTA5Dataset, read_image
from ssr.data.stream import CropRecord

from helpers import cpu_trainer, normalised

CS_FRAME = "frankfurt_000000_000294"
GTA_FRAME = "real_frame_1914x1052.png"


# --- datasets on tiny trees ---------------------------------------------------------------------


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def label_blocks(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """Train ids: road below, sky above, a car block and a small bicycle block."""
    h, w = hw
    lbl = np.full(hw, 10, np.uint8)
    lbl[h // 2 :] = 0
    y, x = rng.integers(h // 4, h // 2), rng.integers(0, w - 16)
    lbl[y : y + 10, x : x + 16] = 13
    y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
    lbl[y : y + 6, x : x + 6] = 18
    lbl[0, :] = 255
    return lbl


def make_gta(root: Path, n: int = 6, hw: tuple[int, int] = (44, 80), seed: int = 0) -> Path:
    """A converted GTA5 tree (train-id labels + RCS statistics written by the real CLI)."""
    rng = np.random.default_rng(seed)
    for i in range(n, 0, -1):  # written out of order: the dataset must sort
        write_png(root / "images" / f"{i:05d}.png", rng.integers(0, 255, (*hw, 3), np.uint8))
        write_png(root / "labels" / f"{i:05d}_labelTrainIds.png", label_blocks(rng, hw))
    # Statistics from the converted labels, written the way the CLI does it.
    per_file = []
    for p in sorted((root / "labels").glob("*_labelTrainIds.png")):
        per_file.append((f"labels/{p.name}", prepare.class_counts(np.asarray(Image.open(p)))))
    stats, _, with_class = prepare.rcs_statistics(per_file)
    (root / "sample_class_stats.json").write_text(json.dumps(stats))
    (root / "samples_with_class.json").write_text(json.dumps(with_class))
    return root


def make_cityscapes(root: Path, n_train: int = 3, n_val: int = 2, hw=(32, 64), seed=1) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = "aachen" if i % 2 else "bonn"
            stem = f"{city}_000000_{i:06d}"
            write_png(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                rng.integers(0, 255, (*hw, 3), np.uint8),
            )
            write_png(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png",
                label_blocks(rng, hw),
            )
    return root


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("trees")
    return make_gta(base / "gta"), make_cityscapes(base / "cityscapes")


def test_gta_dataset_sorted_items(trees: tuple[Path, Path]) -> None:
    gta, _ = trees
    ds = GTA5Dataset(gta, T.source_train_transform((64, 36), (32, 32)))
    assert [p.name for p in ds.images] == [f"{i:05d}.png" for i in range(1, 7)]
    assert ds.labels[0].name == "00001_labelTrainIds.png"
    item = ds[0]
    assert item["img"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert item["label"].dtype == torch.int64 and item["ori_size"].tolist() == [44, 80]


def test_cityscapes_recursive_sorted_scan(trees: tuple[Path, Path]) -> None:
    _, cs = trees
    ds = CityscapesDataset(cs, "train")
    names = [p.name for p in ds.images]
    assert names == sorted(names, key=lambda n: (n.split("_")[0], n))
    assert [p.parent.name for p in ds.images] == ["aachen", "bonn", "bonn"]
    assert ds[1]["img"].shape == (3, 32, 64)  # default transform: normalise only


def _gta_pair(root: Path, image_hw: tuple[int, int], label_hw: tuple[int, int]) -> Path:
    write_png(root / "images" / "00001.png", np.full((*image_hw, 3), 90, np.uint8))
    write_png(root / "labels" / "00001_labelTrainIds.png", np.full(label_hw, 13, np.uint8))
    return root


def test_gta_size_mismatch_faithful_and_aligned(tmp_path: Path) -> None:
    # Image 20x40, label 22x40 (different aspect). Resize to fit (20, 10): the image becomes
    # 10x20, the label on its own 10x18 (factor 10/22), so its crop is padded with 255 (§7.5).
    root = _gta_pair(tmp_path, (20, 40), (22, 40))
    pipeline = T.train_transform(resize=(20, 10), crop_size=(10, 20))
    faithful = GTA5Dataset(root, pipeline)
    assert faithful.read(0)[1].shape == (22, 40)
    lbl = faithful[0]["label"]
    assert lbl.shape == (10, 20) and (lbl[:, 18:] == 255).all() and (lbl[:, :18] == 13).all()
    aligned = GTA5Dataset(root, pipeline, align_label_to_image=True)
    assert aligned.read(0)[1].shape == (20, 40)
    assert (aligned[0]["label"] == 13).all()


@pytest.mark.parametrize("dataset", ["gta5", "cityscapes"])
def test_missing_and_empty_roots(tmp_path: Path, dataset: str) -> None:
    cls = GTA5Dataset if dataset == "gta5" else CityscapesDataset
    with pytest.raises(DatasetError, match=r"nope does not exist"):
        cls(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty is empty"):
        cls(tmp_path / "empty")
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "frames").mkdir()
    with pytest.raises(DatasetError, match=r"has no (images|leftImg8bit/train)/ folder"):
        cls(tmp_path / "wrong")


def test_gta_layout_errors(tmp_path: Path) -> None:
    root = tmp_path / "gta"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    with pytest.raises(DatasetError, match=r"no \*\.png images under .*images"):
        GTA5Dataset(root)
    write_png(root / "images" / "00001.png", np.zeros((4, 4, 3), np.uint8))
    write_png(root / "images" / "00002.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"00001\.png has no label .*00001_labelTrainIds.png"):
        GTA5Dataset(root)
    write_png(root / "labels" / "00001.png", np.zeros((4, 4), np.uint8))  # raw, not converted
    with pytest.raises(DatasetError, match=r"\(and 1 more\); run python -m ssr.data.prepare gta5"):
        GTA5Dataset(root)


def test_unreadable_files_name_the_path(tmp_path: Path) -> None:
    root = _gta_pair(tmp_path, (8, 8), (8, 8))
    bad_image = root / "images" / "00001.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=f"cannot read image {bad_image}"):
        GTA5Dataset(root)[0]
    write_png(bad_image, np.zeros((8, 8, 3), np.uint8))
    bad_label = root / "labels" / "00001_labelTrainIds.png"
    write_png(bad_label, np.zeros((8, 8, 3), np.uint8))  # colour label
    with pytest.raises(DatasetError, match="not a single-channel 8-bit train-id PNG"):
        GTA5Dataset(root)[0]
    write_png(bad_label, np.full((8, 8), 26, np.uint8))  # label ids, not train ids
    with pytest.raises(DatasetError, match="holds value 26, not a train id"):
        GTA5Dataset(root)[0]


def test_cityscapes_label_errors(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path / "cs", n_train=1, n_val=1)
    label = next((root / "gtFine" / "val").rglob("*_labelTrainIds.png"))
    write_png(label, np.zeros((16, 64), np.uint8))
    with pytest.raises(DatasetError, match=r"is 64x16 but image .* is 64x32"):
        CityscapesDataset(root, "val")[0]
    label.rename(label.with_name(label.name.replace("labelTrainIds", "labelIds")))
    with pytest.raises(DatasetError, match=r"run python -m ssr.data.prepare cityscapes"):
        CityscapesDataset(root, "val")
    assert len(CityscapesDataset(root, "val", label=False)) == 1  # target images need no labels
    shutil.rmtree(root / "gtFine")
    with pytest.raises(DatasetError, match=r"no gtFine/val/ folder"):
        CityscapesDataset(root, "val")


# --- the datamodule -----------------------------------------------------------------------------

TINY = {
    "source_resize": (64, 36),
    "target_resize": (64, 32),
    "crop_size": (32, 32),
    "test_resize": (32, 16),
    "batch_size": 2,
    "num_workers": 0,
}
RCS = {"temperature": 0.01, "min_pixels": 20, "min_crop_ratio": 0.5}


def datamodule(trees: tuple[Path, Path], **kwargs) -> UDADataModule:
    gta, cs = trees
    dm = UDADataModule(str(gta), str(cs), **{**TINY, "rcs": RCS, "seed": 0, **kwargs})
    dm.setup("fit")
    return dm


def take(dm: UDADataModule, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], CropRecord):
                assert x[key].file == y[key].file, key
                assert torch.equal(x[key].box, y[key].box), key
            else:
                torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)


def test_train_and_val_batches_follow_the_contract(trees: tuple[Path, Path]) -> None:
    dm = datamodule(trees)
    (batch,) = take(dm, 1)
    assert set(batch) == {"src_img", "src_lbl", "src_crop", "tgt_img", "tgt_crop", "index"}
    assert batch["index"].tolist() == [0, 1]
    for key, folder in (("src_crop", "images/"), ("tgt_crop", "leftImg8bit/train/")):
        crop = batch[key]
        assert isinstance(crop, CropRecord) and len(crop.file) == 2
        assert all(f.startswith(folder) and f.endswith(".png") for f in crop.file)
        assert crop.box.shape == (2, 5) and crop.box.dtype == torch.int64
        height, width, top, left, flip = crop.box.T
        assert (top >= 0).all() and (top + 32 <= height).all()
        assert (left >= 0).all() and (left + 32 <= width).all()
        assert set(flip.tolist()) <= {0, 1}
    # The boxes hold the resized size: GTA 44x80 to fit (64, 36) by 0.8; Cityscapes 32x64 as is.
    assert batch["src_crop"].box[:, :2].tolist() == [[35, 64]] * 2
    assert batch["tgt_crop"].box[:, :2].tolist() == [[32, 64]] * 2
    for i, (file, (_, _, top, left, flip)) in enumerate(zip(*batch["tgt_crop"], strict=True)):
        rgb = read_image(trees[1] / file)[top : top + 32, left : left + 32]  # not resized
        expected = normalised(rgb[:, ::-1] if flip else rgb)
        np.testing.assert_allclose(
            batch["tgt_img"][i].permute(1, 2, 0).numpy(), expected, atol=1e-4
        )
    assert batch["src_img"].shape == batch["tgt_img"].shape == (2, 3, 32, 32)
    assert batch["src_img"].dtype == torch.float32
    assert batch["src_lbl"].shape == (2, 32, 32) and batch["src_lbl"].dtype == torch.int64
    assert set(batch["src_lbl"].unique().tolist()) <= {0, 10, 13, 18, 255}
    val = next(iter(dm.val_dataloader()))
    assert val["img"].shape == (1, 3, 16, 32)
    assert val["label"].shape == (1, 32, 64) and val["label"].dtype == torch.int64
    assert len(val["path"]) == 1 and val["path"][0].endswith("_leftImg8bit.png")
    assert dm.test_dataloader().batch_size == 1


def test_rcs_source_crops_keep_the_drawn_class(trees: tuple[Path, Path]) -> None:
    dm = datamodule(trees)
    ds = dm.train_set
    assert dm.rcs_sampler is not None and dm.rcs_sampler.classes[0] == 18  # rarest class
    kept = 0
    for i in range(20):
        _, class_id, *_ = ds.draw(i)
        kept += dm.rcs_sampler.accepts(ds[i]["src_lbl"], class_id)
    assert kept >= 18


def test_stream_is_deterministic_and_worker_independent(trees: tuple[Path, Path]) -> None:
    first = take(datamodule(trees), 2)
    assert_same(first, take(datamodule(trees), 2))
    assert_same(first, take(datamodule(trees, num_workers=1), 2))
    other = take(datamodule(trees, seed=1), 1)[0]
    assert not torch.equal(other["src_img"], first[0]["src_img"])


def test_state_dict_resumes_the_stream(trees: tuple[Path, Path]) -> None:
    dm = datamodule(trees)
    batches = take(dm, 4)
    state = dm.state_dict()
    assert state["seed"] == 0 and state["next_index"] == 8 and "rng" in state["rcs"]
    fresh = datamodule(trees, seed=None)
    fresh.load_state_dict({**state, "next_index": 4})
    assert_same(batches[2:], take(fresh, 2))


def test_seed_defaults_to_the_global_seed(
    trees: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # restored after the test
        monkeypatch.setenv(name, "")
    L.seed_everything(5, workers=True)
    assert datamodule(trees, seed=None).seed == 5
    torch.seed(), np.random.seed(), random.seed()  # leave no fixed global seed behind


def test_source_only_and_uniform_sampling(trees: tuple[Path, Path]) -> None:
    dm = datamodule(trees, rcs=None, with_target=False)
    assert dm.rcs_sampler is None
    (batch,) = take(dm, 1)
    assert set(batch) == {"src_img", "src_lbl", "src_crop", "index"}


def test_setup_errors(trees: tuple[Path, Path], tmp_path: Path) -> None:
    gta, cs = trees
    no_images = tmp_path / "cs"
    (no_images / "leftImg8bit" / "train" / "bonn").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no \*_leftImg8bit.png images under .*train"):
        UDADataModule(str(gta), str(no_images), **TINY).setup("fit")
    bare = tmp_path / "gta"
    shutil.copytree(gta, bare)
    (bare / "samples_with_class.json").unlink()
    with pytest.raises(DatasetError, match=r"run python -m ssr.data.prepare gta5"):
        UDADataModule(str(bare), str(cs), **TINY, rcs=RCS).setup("fit")
    with pytest.raises(TypeError, match="min_pixel"):
        UDADataModule(str(gta), str(cs), rcs={"min_pixel": 3})
    with pytest.raises(ValueError, match="crop_size"):
        UDADataModule(str(gta), str(cs), crop_size=(512,))


class _Consumer(L.LightningModule):
    """Records the source crops it sees; the smallest module Lightning will fit."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["src_img"].clone())
        return (self.weight - batch["src_img"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_checkpoint_carries_and_restores_the_stream(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    def trainer(steps: int) -> L.Trainer:
        return cpu_trainer(steps, limit_val_batches=0)

    full, dm = _Consumer(), datamodule(trees)
    trainer(4).fit(full, datamodule=dm)
    first, dm = _Consumer(), datamodule(trees)
    run = trainer(2)
    run.fit(first, datamodule=dm)
    run.save_checkpoint(tmp_path / "two.ckpt")
    ckpt = torch.load(tmp_path / "two.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["UDADataModule"]["seed"] == 0 and ckpt["UDADataModule"]["next_index"] >= 4
    second = _Consumer()
    trainer(4).fit(second, datamodule=datamodule(trees, seed=None), ckpt_path=tmp_path / "two.ckpt")
    assert len(full.seen) == 4 and len(first.seen) == len(second.seen) == 2
    for a, b in zip(full.seen, first.seen + second.seen, strict=True):
        assert torch.equal(a, b)
