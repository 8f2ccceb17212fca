"""Multi-process training: per-rank sample streams, and 2-process gloo DDP through the
real `python -m ssr.train trainer=ddp` launch (Hydra re-launch, one run directory) on CPU."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.errors import MissingConfigException
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from ssr.data.datasets import CityscapesDataset
from ssr.data.stream import InfiniteIndexSampler
from ssr.eval import evaluate
from ssr.model.checkpoint import load_segmentor
from ssr.model.inference import Inference
from ssr.run.rng import RNGStateCallback, collect_rng_states, rank_seed, set_rng_states
from ssr.run.trainer import AtomicCheckpointIO, TrainerConfigError, build_trainer
from ssr.uda.mixing import DACSMixing

from helpers import CLI_ENV, compose_cfg, synthetic_data


def batches(sampler: InfiniteIndexSampler, batch: int, n: int) -> list[list[int]]:
    it = iter(sampler)
    return [[next(it) for _ in range(batch)] for _ in range(n)]


@pytest.mark.parametrize("world", [2, 3])
def test_rank_streams_partition_the_single_process_stream(world: int) -> None:
    b, steps, start = 2, 4, 10  # e.g. resumed at sample 10
    single = batches(InfiniteIndexSampler(start), b * world, steps)
    ranks = [batches(InfiniteIndexSampler(start, r, world), b, steps) for r in range(world)]
    for step in range(steps):
        joined = sorted(itertools.chain.from_iterable(ranks[r][step] for r in range(world)))
        assert joined == single[step]
    # Every rank derives the same global position from its own last batch (what is saved).
    for r in range(world):
        assert max(ranks[r][-1]) - r + world == start + steps * b * world
    with pytest.raises(ValueError, match="rank 2 must lie in"):
        InfiniteIndexSampler(0, 2, 2)


def test_ranks_above_zero_get_their_own_global_and_module_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`seed_everything` gives every rank the same seed; `RNGStateCallback` re-seeds ranks > 0 from
    (seed, rank): the global streams and the module's own (ClassMix, jitter, MIC masks)."""

    def same(a: dict, b: dict) -> bool:
        return (
            a["numpy"] == b["numpy"]
            and a["python"] == b["python"]
            and torch.equal(a["torch"], b["torch"])
        )

    monkeypatch.setenv("PL_GLOBAL_SEED", "3")  # what seed_everything(3) sets
    saved = collect_rng_states()
    try:
        mixing = DACSMixing(seed=3)
        module = SimpleNamespace(random_streams=lambda: {"mixing": mixing})
        rank0 = mixing.rng_state()
        RNGStateCallback().setup(SimpleNamespace(global_rank=0), module, "fit")
        assert same(mixing.rng_state(), rank0)  # rank 0 keeps the single-process streams
        RNGStateCallback().setup(SimpleNamespace(global_rank=1), module, "fit")
        seed = rank_seed(3, 1)
        expected = DACSMixing(seed=3)
        expected.reseed([3, 1], seed)
        assert same(mixing.rng_state(), expected.rng_state())
        assert not same(mixing.rng_state(), rank0)
        assert torch.initial_seed() == seed
        assert np.random.random() == np.random.RandomState(seed).random()
        assert random.random() == random.Random(seed).random()
    finally:
        set_rng_states(saved)


def test_ddp_trainer_config(tmp_path: Path) -> None:
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    cfg = compose_cfg("train", *ddp, f"paths.output_dir={tmp_path}")
    trainer = build_trainer(cfg, [], [])
    assert trainer.world_size == 2 and isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is True
    assert str(trainer.precision) == "32-true"  # precision: auto on a CPU
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, RNGStateCallback) for c in trainer.callbacks)
    # Lightning's DistributedSampler cannot wrap the endless stream: refused with the fix.
    cfg = compose_cfg(
        "train", *ddp, "trainer.use_distributed_sampler=true", f"paths.output_dir={tmp_path}"
    )
    with pytest.raises(TrainerConfigError, match="use_distributed_sampler=false"):
        build_trainer(cfg, [], [])


def test_slurm_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    cfg = compose_cfg("train", "trainer=slurm")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 4)
    assert cfg.trainer.plugins[0].auto_requeue is False  # ssr.run.preemption handles SIGUSR1
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (optional extra `slurm`)
    except ImportError:
        with pytest.raises(MissingConfigException, match="submitit_slurm"):
            compose_cfg("train", "hydra/launcher=slurm", hydra=True)
    else:
        launcher = compose_cfg("train", "hydra/launcher=slurm", hydra=True).hydra.launcher
        assert launcher.timeout_min == 2880


# ------------------------------------------------------------------- 2 processes, gloo, CPU
class FreezeBatchNorm(pl.Callback):
    """BatchNorm on running statistics: per-sample computation, so DDP can match exactly.

    With batch statistics DDP normalises over each process's crops (SyncBatchNorm, which would
    use the global batch, runs on GPUs only); this test isolates everything else DDP does.
    """

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        for m in pl_module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


TESTS = str(Path(__file__).resolve().parent)
# The launched processes import `test_ddp.FreezeBatchNorm` (a callback added on the command line).
ENV = {
    **CLI_ENV,
    "HYDRA_FULL_ERROR": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])),
}
STEPS = 3


def run_train(synthetic_root: Path, run_dir: Path, *extra: str) -> None:
    cmd = [
        sys.executable, "-m", "ssr.train", *synthetic_data(synthetic_root),
        "data.num_workers=0", "data.rcs.min_pixels=10",
        f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
        "trainer.log_every_n_steps=1", "callbacks.debug_images.every_n_steps=1000",
        f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def train_losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/src_ce")]
    return [float(r["train/src_ce"]) for r in rows]


def student(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_global_batch(
    synthetic_root: Path, tmp_path: Path
) -> None:
    # Source-only, no dropout / drop-path (their masks come from per-rank streams), BatchNorm
    # on running statistics (`FreezeBatchNorm`): one process with batch 4 and two with batch 2
    # then compute the same per-sample losses, and DDP's averaged gradient is the same mean.
    common = [
        "experiment=demo", "model.backbone.drop_path_rate=0", "model.decode_head.dropout=0",
        "+callbacks.freeze_bn._target_=test_ddp.FreezeBatchNorm",
    ]  # fmt: skip
    run_train(synthetic_root, tmp_path / "single", *common, "data.batch_size=4")
    ddp = tmp_path / "ddp"
    run_train(
        synthetic_root, ddp, *common, "data.batch_size=2",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
    )  # fmt: skip

    # One run directory: the re-launched rank 1 wrote into the parent's (no second timestamp).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    ckpt = torch.load(ddp / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert ckpt["UDADataModule"]["next_index"] == STEPS * 2 * 2  # global count of samples
    assert len(ckpt["global_rng"]) == 2 and len(ckpt["module_rng"]) == 2  # one per rank
    assert not torch.equal(ckpt["global_rng"][0]["torch"], ckpt["global_rng"][1]["torch"])

    # Same loss (logged as the mean over ranks) and weights as one process with batch 4, up to
    # float summation order (a mean of two means, gloo's all-reduce): 1e-5 relative.
    single_loss, ddp_loss = train_losses(tmp_path / "single"), train_losses(ddp)
    assert len(single_loss) == len(ddp_loss) == STEPS
    torch.testing.assert_close(torch.tensor(ddp_loss), torch.tensor(single_loss), rtol=1e-5, atol=0)
    a, b = student(tmp_path / "single"), student(ddp)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)

    # Test metrics are reduced over ranks: rank r scored images r, r+2, ...; the sum of the
    # confusion matrices equals one process scoring all images with the same weights.
    metrics = json.loads((ddp / "metrics.json").read_text())
    seg, _, _ = load_segmentor(ddp / "checkpoints" / "last.ckpt", {})
    val = CityscapesDataset(synthetic_root / "cityscapes", "val")
    ref = evaluate(seg, val, Inference(resize=(128, 64)), progress=False)  # the demo's protocol
    assert metrics["num_images"] == ref["num_images"] == len(val)
    assert metrics["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-6)
    assert metrics["aAcc"] == pytest.approx(ref["aAcc"], abs=1e-6)


@pytest.mark.slow
def test_ddp_separate_backward_calls_equal_one_summed_backward(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """MIC + SSR under DDP: 3 backward calls per step, each all-reduced (find_unused_parameters,
    the SSR branch and MIC touch different parameters) give the weights of one summed backward."""
    common = [
        # Batch 1 per rank at 64 px: the head's stride-32 maps are 2x2, so its BatchNorm is not
        # degenerate (on 1x1 maps BN zeroes the true gradient of the ASPP convs, and Adam turns
        # the leftover rounding noise into full-size steps that differ run to run).
        "experiment=demo_mic_ssr", "data.batch_size=1",
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "test_after_fit=false",
    ]  # fmt: skip
    for single in ("false", "true"):
        run_train(synthetic_root, tmp_path / single, *common, f"uda.single_backward={single}")
    separate, summed = student(tmp_path / "false"), student(tmp_path / "true")
    for k in separate:
        torch.testing.assert_close(summed[k], separate[k], rtol=1e-5, atol=1e-6, msg=k)
    ckpt = torch.load(tmp_path / "false" / "checkpoints" / "last.ckpt", weights_only=True)
    # Rank 1 drew its ClassMix / jitter / MIC masks from its own stream.
    mixing = [rank["mixing"] for rank in ckpt["module_rng"]]
    assert mixing[0]["numpy"] != mixing[1]["numpy"]
    assert not torch.equal(mixing[0]["torch"], mixing[1]["torch"])
