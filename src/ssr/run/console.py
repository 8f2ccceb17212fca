"""Console hygiene: third-party chatter filtered out precisely, so a run shows ssr's own output.

Only messages known to be noise for ssr runs are dropped, each by its exact text; every other
warning still shows.
"""

from __future__ import annotations

import logging
import warnings

# Warnings (message regex) that say nothing about an ssr run:
NOISY_WARNINGS = (
    # Lightning's ModelCheckpoint lecture with example code: ssr saves at step boundaries, after
    # the optimiser step, on purpose (that is what exact resume needs).
    r"Using ModelCheckpoint with manual optimization",
    # The frozen SAM encoder and the ImageNet FD backbone are in eval mode by design.
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # Lightning's own use of a torch API that torch deprecates; nothing a user can act on.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
# Lightning info lines (log record prefixes): an advertisement and the accelerator lines that
# ssr's start-up table already shows.
NOISY_INFO = ("💡 Tip:", "GPU available:", "TPU available:")
_LIGHTNING_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISY_INFO)


def quiet_third_party() -> None:
    """Drop the known third-party noise (idempotent; call at the start of every CLI)."""
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropInfo) for f in logger.filters):
            logger.addFilter(_DropInfo())
