"""Every random stream of a run in its checkpoints, so that a resumed run continues bit-for-bit.

Two kinds of streams are saved per rank: the process-global ones (torch CPU/CUDA, NumPy, Python;
dropout and drop-path draw from torch's) and the module's own generators, owned by the UDA parts
that draw augmentations (`pl_module.random_streams()`, e.g. ClassMix classes, jitter factors, MIC
masks). Under DDP, ranks > 0 get their own streams seeded from (seed, rank).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

GLOBAL_KEY = "global_rng"  # checkpoint keys: one entry per rank
MODULE_KEY = "module_rng"


class RandomStreams(Protocol):
    """An object that owns generators (the UDA mixing/augmentation part)."""

    seed: int

    def rng_state(self) -> dict[str, Any]: ...

    def load_rng_state(self, state: Mapping[str, Any]) -> None: ...

    def reseed(self, numpy_seed: Sequence[int], seed: int) -> None: ...


def collect_rng_states() -> dict[str, Any]:
    """The process-global RNG states, as plain types (loadable with `weights_only=True`)."""
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of `collect_rng_states`; CUDA states are restored only for the same device count."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed of rank `rank`'s own stream, independent of the other ranks' streams."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def gather_from_ranks(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]`; `[obj]` outside torch.distributed.

    Collective: under DDP every rank must call it (checkpoint hooks run on every rank).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def for_this_rank(states: Sequence[Any] | None, rank: int, world_size: int) -> Any | None:
    """This rank's entry of a per-rank list saved with `gather_from_ranks`, or None.

    With a different world size only rank 0 gets its state back; the other ranks keep their
    freshly seeded streams (the run is then no longer bit-exact, which is logged).
    """
    if not states:
        return None
    if len(states) == world_size:
        return states[rank]
    log.warning(
        f"checkpoint holds RNG states of {len(states)} ranks, this run has {world_size}: "
        "only rank 0 resumes its random streams exactly"
    )
    return states[0] if rank == 0 else None


def _module_streams(pl_module: pl.LightningModule) -> dict[str, RandomStreams]:
    streams = getattr(pl_module, "random_streams", None)
    return streams() if callable(streams) else {}


class RNGStateCallback(pl.Callback):
    """Global and module RNG states of every rank in checkpoints, restored on resume.

    The global states are restored right before the first resumed step rather than at load time:
    between loading and the first step Lightning builds the data loader iterators, and nothing that
    happens there may shift the streams the training step draws from. Module streams are restored
    at load time (nothing draws from them before the first step). Under DDP, ranks > 0 are
    re-seeded at setup with `rank_seed(seed, rank)`, so their dropout masks and augmentations
    differ from rank 0's (`seed_everything` gives every rank the same seed).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rank = trainer.global_rank
        if stage != "fit" or rank == 0:
            return
        seed = rank_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), rank)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        for owner in _module_streams(pl_module).values():
            owner.reseed([owner.seed, rank], rank_seed(owner.seed, rank))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[GLOBAL_KEY] = gather_from_ranks(collect_rng_states())
        module = {name: owner.rng_state() for name, owner in _module_streams(pl_module).items()}
        checkpoint[MODULE_KEY] = gather_from_ranks(module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        self._pending = for_this_rank(checkpoint.get(GLOBAL_KEY), rank, world)
        module = for_this_rank(checkpoint.get(MODULE_KEY), rank, world) or {}
        for name, owner in _module_streams(pl_module).items():
            if name in module:
                owner.load_rng_state(module[name])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
