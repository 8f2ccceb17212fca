"""The benchmark demos end to end on CPU (docs/benchmarks.md): each pair trains a few steps on
the synthetic scenes written in its raw formats and prepared by `ssr.data.prepare`, then is
evaluated; SYNTHIA reports mIoU16 / mIoU13 beside mIoU, ACDC and Dark Zurich export test-server
submissions."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ssr import eval as ssr_eval
from ssr import predict as ssr_predict
from ssr import train as ssr_train
from ssr.data import prepare
from ssr.data.labels import CLASSES

from helpers import call_hydra_main, exit_code, torch_threads

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "own_data"

SHORT = ["trainer.max_steps=2", "trainer.val_check_interval=2", "data.num_workers=0"]
SHORT += [
    "data.rcs.min_pixels=10",
    "data.batch_size=2",
    "logger=csv",
    "callbacks.debug_images=null",
]


def _train(monkeypatch: pytest.MonkeyPatch, run: Path, experiment: str, *roots: str) -> Path:
    overrides = [f"experiment={experiment}", *roots, *SHORT]
    with torch_threads(1):
        assert call_hydra_main(ssr_train.main, monkeypatch, run, overrides) == 0
    return run / "checkpoints" / "last.ckpt"


def test_demo_synthia_reports_miou16_and_miou13(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "synthia"
    roots = [f"data.source_root={synthetic_root / 'synthia'}"]
    roots.append(f"data.target_root={synthetic_root / 'cityscapes'}")
    _train(monkeypatch, run, "demo_synthia", *roots)
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["IoU"]) == list(CLASSES)
    for key, excluded in (("mIoU16", {9, 14, 16}), ("mIoU13", {3, 4, 5, 9, 14, 16})):
        values = [v for i, v in enumerate(metrics["IoU"].values()) if i not in excluded]
        present = [v for v in values if v is not None]
        assert metrics[key] == pytest.approx(sum(present) / len(present))
    assert "mIoU16" in capsys.readouterr().out  # the printed table
    stats = json.loads((synthetic_root / "synthia" / "sample_class_stats.json").read_text())
    assert not {"9", "14", "16"} & {k for entry in stats for k in entry}  # never in SYNTHIA


@pytest.mark.parametrize(
    ("experiment", "target", "fmt", "folders"),
    [
        ("demo_acdc", "acdc", "acdc", ["labelTrainIds"]),
        (
            "demo_darkzurich",
            "dark_zurich",
            "darkzurich",
            ["labelTrainIds", "labelTrainIds_invalid", "confidence"],
        ),
    ],
)
def test_demo_adverse_trains_evaluates_and_exports_a_submission(
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    experiment: str,
    target: str,
    fmt: str,
    folders: list[str],
) -> None:
    root = synthetic_root / target
    run = tmp_path / experiment
    roots = [f"data.source_root={synthetic_root / 'cityscapes'}", f"data.target_root={root}"]
    ckpt = _train(monkeypatch, run, experiment, *roots)
    metrics = json.loads((run / "metrics.json").read_text())
    val_images = sorted(root.glob("rgb_anon/**/val/**/*_rgb_anon.png"))
    assert metrics["num_images"] == len(val_images) > 0

    # ssr.eval on the target's val split scores the same images at full resolution.
    args = [f"ckpt_path={ckpt}", f"dataset={fmt}", f"gt_root={root}", "num_workers=0"]
    args += ["inference.resize=[120,68]", f"output_dir={run / 'eval'}"]
    assert call_hydra_main(ssr_eval.main, monkeypatch, run / "eval_run", args) == 0
    scored = json.loads((run / "eval" / "metrics.json").read_text())
    assert scored["num_images"] == len(val_images)
    assert scored["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)

    # The test-server export: flat folders at the original size, zipped.
    out = run / "submission"
    args = [f"ckpt_path={ckpt}", f"input={root / 'rgb_anon'}", f"output_dir={out}"]
    args += [f"format={fmt}", "inference.resize=[120,68]"]
    assert call_hydra_main(ssr_predict.main, monkeypatch, run / "predict_run", args) == 0
    tests = sorted(p for p in root.glob("rgb_anon/**/test/**/*_rgb_anon.png"))
    expected = {f"{folder}/{p.stem}.png" for folder in folders for p in tests}
    with zipfile.ZipFile(out / f"{fmt}_submission.zip") as archive:
        assert set(archive.namelist()) == expected
    with (
        Image.open(out / "labelTrainIds" / f"{tests[0].stem}.png") as im,
        Image.open(tests[0]) as src,
    ):
        assert im.mode == "P" and im.size == src.size
        assert np.asarray(im).max() < len(CLASSES)


def test_own_data_walkthrough(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, "Train on your own data": the example two-folder format, prepared and checked by
    `ssr.data.prepare`, trains with the example pair config from its own config directory."""
    own = tmp_path / "own"
    for folder in ("images", "labels"):
        (own / folder).mkdir(parents=True)
        for path in sorted((synthetic_root / "gta" / folder).glob("[0-9]*[0-9].png")):
            shutil.copy(path, own / folder / path.name)
    fmt = EXAMPLES / "two_folders.yaml"
    assert exit_code(prepare.main, [str(fmt), str(own), "--nproc", "1"]) == 0
    assert len(list((own / "labels").glob("*_trainIds.png"))) == 8
    assert (own / "samples_with_class.json").is_file()

    run = tmp_path / "run"
    overrides = ["--config-dir", str(EXAMPLES / "conf"), "experiment=demo_daformer", "data=my_pair"]
    overrides += [f"data.source_format={fmt}", f"data.source_root={own}"]
    overrides += [f"data.target_root={synthetic_root / 'cityscapes'}", *SHORT]
    with torch_threads(1):
        assert call_hydra_main(ssr_train.main, monkeypatch, run, overrides) == 0
    assert json.loads((run / "metrics.json").read_text())["num_images"] == 2


THREE = {"names": ["road", "car", "sky"], "palette": [[128, 64, 128], [0, 0, 142], [70, 130, 180]]}
THREE_IDS = {7: 0, 26: 1, 23: 2}  # Cityscapes label ids of road, car, sky; the rest is ignored


def test_own_class_list_trains_a_head_of_its_size(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Formats with their own 3-class list (docs/benchmarks.md §4): prepare maps both domains,
    training refuses the 19-output head, trains a 3-output one, and scores the 3 classes."""
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    shutil.copytree(synthetic_root / "gta" / "images", src / "images")
    shutil.copytree(synthetic_root / "gta" / "labels", src / "labels", ignore=_converted)
    shutil.copytree(synthetic_root / "cityscapes" / "leftImg8bit", tgt / "leftImg8bit")
    shutil.copytree(synthetic_root / "cityscapes" / "gtFine", tgt / "gtFine", ignore=_converted)
    raw = {"encoding": "index", "id_map": THREE_IDS}
    formats = {
        "src": {"splits": {"train": {"images": "images", "labels": "labels"}},
                "image_suffix": ".png", "raw_labels": {**raw, "suffix": ".png"}},
        "tgt": {"splits": {s: {"images": f"leftImg8bit/{s}", "labels": f"gtFine/{s}"}
                           for s in ("train", "val")},
                "image_suffix": "_leftImg8bit.png",
                "raw_labels": {**raw, "suffix": "_gtFine_labelIds.png"}},
    }  # fmt: skip
    for name, spec in formats.items():
        spec |= {"name": name, "classes": THREE, "label_suffix": "_three.png", "rcs_split": "train"}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        root = str(tmp_path / name)
        assert (
            exit_code(prepare.main, [str(tmp_path / f"{name}.yaml"), root, "--num-classes", "3"])
            == 0
        )

    data = [f"data.source_format={tmp_path / 'src.yaml'}", f"data.source_root={src}"]
    data += [f"data.target_format={tmp_path / 'tgt.yaml'}", f"data.target_root={tgt}"]
    args = ["experiment=demo_daformer", *data, *SHORT]
    assert call_hydra_main(ssr_train.main, monkeypatch, tmp_path / "r19", args) == 2
    assert "model.decode_head.num_classes=3" in capsys.readouterr().err
    run = tmp_path / "r3"
    with torch_threads(1):
        assert (
            call_hydra_main(
                ssr_train.main, monkeypatch, run, [*args, "model.decode_head.num_classes=3"]
            )
            == 0
        )
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["IoU"]) == THREE["names"]


def _converted(folder: str, names: list[str]) -> list[str]:
    """copytree filter: raw labels only (no train-id outputs of the session's preparation)."""
    return [n for n in names if n.endswith("_labelTrainIds.png")]
