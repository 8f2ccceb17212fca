"""Rare Class Sampling of DAFormer (Hoyer et al. 2022), docs/method.md §4.2.

Source samples are drawn class-first: c ~ softmax((1 - f_c) / T) over the classes sorted by pixel
frequency f_c (T = 0.01 peaks it on the rarest classes), then a file uniformly among those with
strictly more than ``min_pixels`` pixels of c at full resolution. A crop is accepted when it keeps
more than ``min_pixels * min_crop_ratio`` pixels of c. The statistics come from
``python -m ssr.data.prepare FORMAT ROOT``.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssr.data.files import DatasetError
from ssr.errors import ConfigError

STATS_FILE = "sample_class_stats.json"
SAMPLES_FILE = "samples_with_class.json"


def _load_json(path: Path, dataset: str) -> Any:
    if not path.is_file():
        raise DatasetError(
            f"rare class sampling needs {path}, which does not exist; run "
            f"python -m ssr.data.prepare {dataset} {path.parent} (or disable RCS: data.rcs=null)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path} is not valid JSON ({err}); delete it and re-run "
            f"python -m ssr.data.prepare {dataset} {path.parent}"
        ) from err


def class_probabilities(
    sample_class_stats: list[dict[str, Any]], temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """(classes sorted by total pixel count ascending, their sampling probabilities)."""
    totals: dict[int, int] = {}
    for entry in sample_class_stats:
        for key, count in entry.items():
            if key != "file":
                totals[int(key)] = totals.get(int(key), 0) + int(count)
    ordered = sorted(totals.items(), key=lambda kv: kv[1])  # stable: ties keep first-seen order
    classes = np.array([c for c, _ in ordered], dtype=np.int64)
    freq = torch.tensor([n for _, n in ordered], dtype=torch.float64)
    freq = freq / freq.sum()
    probs = torch.softmax((1.0 - freq) / temperature, dim=-1)
    return classes, probs.numpy()


class RareClassSampler:
    """Draws (class, label file name) pairs for the source domain (§4.2).

    Args:
        root: source root holding ``sample_class_stats.json`` and ``samples_with_class.json``.
        temperature, min_pixels, min_crop_ratio: the RCS hyper-parameters of the paper.
        available: label file names the dataset actually has; candidates outside it are dropped.
        seed: seed of the generator used when ``sample`` gets none (its state is checkpointable).
        dataset: the source's dataset format, named in the hints to (re-)run ``prepare``.
    """

    def __init__(
        self,
        root: str | Path,
        temperature: float = 0.01,
        min_pixels: int = 3000,
        min_crop_ratio: float = 0.5,
        available: Collection[str] | None = None,
        seed: int | None = None,
        dataset: str = "gta5",
    ):
        if temperature <= 0:
            raise ConfigError(f"RCS temperature must be > 0, got {temperature}")
        self.root = Path(root)
        self.temperature, self.min_pixels, self.min_crop_ratio = (
            temperature,
            min_pixels,
            min_crop_ratio,
        )
        stats = _load_json(self.root / STATS_FILE, dataset)
        samples_with_class = _load_json(self.root / SAMPLES_FILE, dataset)
        self.classes, self.probs = class_probabilities(stats, temperature)
        if len(self.classes) == 0:
            raise DatasetError(
                f"{self.root / STATS_FILE} lists no labelled pixels; re-run "
                f"python -m ssr.data.prepare {dataset} {self.root}"
            )
        # Files are matched to dataset items by label base name (§4.2), so the stats stay valid
        # when the dataset folder moves.
        self.candidates: dict[int, list[str]] = {}
        for c in self.classes.tolist():
            names = [
                Path(file).name
                for file, count in samples_with_class.get(str(c), [])
                if count > min_pixels
            ]
            if available is not None:
                names = [n for n in names if n in available]
            self.candidates[c] = names
        empty = [c for c, names in self.candidates.items() if not names]
        if empty:
            raise DatasetError(
                f"RCS classes {empty} have no file with more than {min_pixels} pixels in "
                f"{self.root / SAMPLES_FILE}; lower rcs.min_pixels or re-run the preparation CLI"
            )
        self.rng = np.random.default_rng(seed)

    @property
    def probabilities(self) -> dict[int, float]:
        """Sampling probability per class id, rarest class first."""
        return dict(zip(self.classes.tolist(), self.probs.tolist(), strict=True))

    @property
    def crop_min_pixels(self) -> float:
        """A crop is accepted when it holds strictly more pixels of the drawn class than this."""
        return self.min_pixels * self.min_crop_ratio

    def sample(self, rng: np.random.Generator | None = None) -> tuple[int, str]:
        """One (class id, label file name) draw; uses the own generator when ``rng`` is None."""
        rng = self.rng if rng is None else rng
        c = int(rng.choice(self.classes, p=self.probs))
        names = self.candidates[c]
        return c, names[int(rng.integers(len(names)))]

    def accepts(self, label: np.ndarray | torch.Tensor, class_id: int) -> bool:
        """Whether a crop's label keeps enough pixels of the drawn class."""
        return int((label == class_id).sum()) > self.crop_min_pixels

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
