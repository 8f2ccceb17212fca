"""Run visibility: wandb offline runs, debug panels, IoU plots, the wandb id on resume."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

import ssr.train
from ssr.data.labels import CLASSES
from ssr.run.panels import BACKGROUND, grid_size, iou_bar_chart, tile_box
from ssr.run.wandb import WANDB_ID_FILE, WANDB_ID_KEY, wandb_logger, wandb_mode
from ssr.train import build_module
from ssr.uda.module import UDAModule

from helpers import (
    call_hydra_main,
    compose_cfg,
    cpu_trainer,
    synthetic_train,
    torch_threads,
    uda_batch,
)


def wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file (a LevelDB-style log of 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, buf, out = 7, b"", []  # 7-byte file header: magic, version
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)  # after a 4-byte checksum
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_run_debug_panels_and_iou_plots(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    out, wandb_dir = tmp_path / "run", tmp_path / "wandb_home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_API_KEY", "")
    overrides = [
        "experiment=demo_mic_ssr",
        "logger=[csv,wandb]",
        *synthetic_train(synthetic_root),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.debug_images.every_n_steps=1",
        "callbacks.debug_images.max_images=1",
        "callbacks.debug_images.tile_size=64",
    ]
    try:
        with torch_threads(1):
            assert call_hydra_main(ssr.train.main, monkeypatch, out, overrides) == 0
    finally:
        wandb.finish()  # what the end of `python -m ssr.train` does: flush and close the run

    # One offline run under WANDB_DIR, its id kept in the run dir and in the checkpoint.
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    assert runs[0].name.endswith(run_id)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt[WANDB_ID_KEY] == run_id

    records = wandb_records(runs[0] / f"run-{run_id}.wandb")
    meta = next(r.run for r in records if r.HasField("run"))
    assert (meta.run_id, meta.display_name, meta.project) == (run_id, "demo_mic_ssr-s0", "ssr")
    assert meta.run_group == "demo_mic_ssr" and "mic" in meta.tags
    history = {i.key or "/".join(i.nested_key) for r in records for i in r.history.item}
    expected = ["train/src_ce", "train/mix_ce", "train/mic_ce", "train/ssr_src_ce", "val/mIoU"]
    expected += ["train/pl_weight", "val/IoU/road", "debug/panel/_type", "val/IoU_bars/_type"]
    expected += ["val/IoU_table/_type", "test/IoU_table/_type"]
    assert not [k for k in expected if k not in history], sorted(history)
    config = {i.key: i.value_json for r in records for i in r.config.update}
    assert config["task_name"] == '"demo_mic_ssr"'  # the resolved Hydra config is with the run
    assert {"data", "model", "uda", "optim", "trainer"} <= config.keys()
    assert str(synthetic_root) in config["data"]  # resolved, not ${paths.data_dir}
    media = runs[0] / "files" / "media" / "images"
    assert len(list((media / "debug").glob("panel_*.png"))) == 2
    assert len(list((media / "val").glob("IoU_bars_*.png"))) == 1

    # Debug panels: MIC + SSR on 1 sample = 5 rows (source, target, mixed, MIC, 4 SSR stages).
    rows = [3, 3, 3, 2, 4]
    for step in (0, 1):
        panel = np.asarray(Image.open(out / "debug" / f"step_{step:06d}.png").convert("RGB"))
        assert panel.shape[1::-1] == grid_size(len(rows), max(rows), (64, 64))
        for r, n in enumerate(rows):
            for c in range(max(rows)):
                left, top, right, bottom = tile_box(r, c, (64, 64))
                tile = panel[top:bottom, left:right]
                drawn = (tile != BACKGROUND).any(axis=-1).mean()
                assert drawn > 0.9 if c < n else drawn == 0.0, (step, r, c)
                if c == 0:  # source / target / mixed / masked image: a picture, not a flat fill
                    assert tile.std() > 5.0, (step, r)
    assert (out / "debug" / "val_iou_step_000002.png").is_file()
    assert (out / "debug" / "test_iou_step_000002.png").is_file()


def test_iou_bar_chart_draws_present_classes_only() -> None:
    iou = {c: None for c in CLASSES} | {"road": 100.0, "car": 50.0}
    img = np.asarray(iou_bar_chart(iou, "val"))
    road, car = (
        np.all(img == np.array(rgb), axis=-1).sum() for rgb in [(128, 64, 128), (0, 0, 142)]
    )
    assert road > 0 and abs(car / road - 0.5) < 0.05  # bar length ∝ IoU
    assert not np.all(img == np.array((220, 20, 60)), axis=-1).any()  # person: n/a, no bar


def fit_two_steps(tmp_path: Path, draw: bool) -> UDAModule:
    cfg = compose_cfg("train", "experiment=demo_mic_ssr", "uda.sam.stages=[3]")
    torch.manual_seed(0)
    module = build_module(cfg)
    callbacks = [instantiate(cfg.callbacks.debug_images, out_dir=str(tmp_path))] if draw else []
    batches = DataLoader([uda_batch(seed=1), uda_batch(seed=2)], batch_size=None)
    with torch_threads(1):
        cpu_trainer(max_steps=2, callbacks=callbacks).fit(module, batches)
    return module


def test_drawing_a_panel_never_changes_training(tmp_path: Path) -> None:
    """Capture steps (extra teacher forward, copies) leave weights and BN statistics bit-equal."""
    plain = fit_two_steps(tmp_path / "plain", draw=False)
    drawn = fit_two_steps(tmp_path / "drawn", draw=True)  # every_n_steps=100: step 0 only
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["step_000000.png"]
    assert drawn.debug is None and not drawn.capture_debug  # copies released after the step
    a, b = plain.state_dict(), drawn.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("offline", "env", "netrc_host", "mode"),
    [
        (None, {}, None, "offline"),  # no key anywhere: offline, sync later
        (None, {"WANDB_API_KEY": "k" * 40}, None, "online"),
        (None, {}, "api.wandb.ai", "online"),  # `wandb login` wrote ~/.netrc
        (None, {"WANDB_BASE_URL": "https://wandb.example.org"}, "api.wandb.ai", "offline"),
        (None, {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k" * 40}, None, "disabled"),
        (False, {"WANDB_MODE": "offline"}, None, "online"),  # asked for explicitly
        (True, {"WANDB_API_KEY": "k" * 40}, None, "offline"),
    ],
)
def test_wandb_mode_follows_key_env_and_setting(
    offline: bool | None,
    env: dict[str, str],
    netrc_host: str | None,
    mode: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    if netrc_host:
        netrc.write_text(f"machine {netrc_host}\n  login user\n  password {'p' * 40}\n")
    monkeypatch.setenv("NETRC", str(netrc))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert wandb_mode(offline)[0] == mode


def test_resume_continues_the_wandb_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    first = wandb_logger(save_dir=str(run), run_dir=str(run)).version
    assert first == (run / WANDB_ID_FILE).read_text().strip() and len(first) == 8
    assert wandb_logger(save_dir=str(run), run_dir=str(run)).version != first  # no resume: new
    assert wandb_logger(save_dir=str(run), run_dir=str(run), ckpt_path="auto").version != first
    # ckpt_path=last: the id stored in the checkpoint (WandbRunId) ...
    (run / "checkpoints").mkdir()
    torch.save({WANDB_ID_KEY: "abcd1234"}, run / "checkpoints" / "last.ckpt")
    resumed = wandb_logger(save_dir=str(run), run_dir=str(run), ckpt_path="last")
    assert resumed.version == "abcd1234" == (run / WANDB_ID_FILE).read_text().strip()
    # ... else the wandb_run_id.txt of the run that wrote it (here: a checkpoint path elsewhere).
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    other = tmp_path / "other"
    resumed = wandb_logger(
        save_dir=str(other), run_dir=str(other), ckpt_path=str(run / "checkpoints" / "last.ckpt")
    )
    assert resumed.version == "abcd1234"
    # A SLURM requeue (no ckpt_path, Lightning restores hpc_ckpt_N.ckpt itself).
    torch.save({WANDB_ID_KEY: "slurm123"}, other / "hpc_ckpt_1.ckpt")
    assert wandb_logger(save_dir=str(other), run_dir=str(other)).version == "slurm123"
