"""DataLoader workers leave signals to the main process.

`scancel`, pre-emption and SLURM's time-limit warning signal every process of a job, and Ctrl-C
every process of the terminal's foreground group, DataLoader workers included. PyTorch's workers
die on SIGTERM and SIGUSR1 (and inherit the main process's SIGINT handler), after which the main
process fails with "DataLoader worker exited unexpectedly" before it can save. Workers ignore these
signals instead: the main process saves at the step boundary and then shuts its workers down.
"""

from __future__ import annotations

import os
import signal
from functools import partial

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _init_worker(worker_id: int, rank: int, seed_workers: bool) -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if seed_workers:  # what Lightning adds to a loader without its own worker_init_fn
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)


def worker_init(rank: int = 0) -> partial[None]:
    """A DataLoader `worker_init_fn` for the workers of global rank `rank`: signals ignored, and
    Lightning's worker seeding kept where `seed_everything(workers=True)` asked for it."""
    return partial(
        _init_worker, rank=rank, seed_workers=bool(int(os.environ.get("PL_SEED_WORKERS", 0)))
    )
