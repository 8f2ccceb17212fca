"""Rare class sampling (docs/method.md §4.2) on a hand-made statistics file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssr.data.datasets import DatasetError
from ssr.data.rcs import RareClassSampler, class_probabilities

# Three label files; class totals n_0 = 3500 + 2000 = 5500, n_13 = 1500 + 3000 + 3001 = 7501,
# n_18 = 3001 + 999 = 4000, sum 17001.
STATS = [
    {"0": 3500, "13": 1500, "file": "labels/00001_labelTrainIds.png"},
    {"0": 2000, "13": 3000, "18": 3001, "file": "labels/00002_labelTrainIds.png"},
    {"13": 3001, "18": 999, "file": "labels/00003_labelTrainIds.png"},
]


def _samples_with_class(stats: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {}
    for entry in stats:
        for key, count in entry.items():
            if key != "file":
                out.setdefault(key, []).append([entry["file"], count])
    return out


@pytest.fixture
def stats_root(tmp_path: Path) -> Path:
    (tmp_path / "sample_class_stats.json").write_text(json.dumps(STATS))
    (tmp_path / "samples_with_class.json").write_text(json.dumps(_samples_with_class(STATS)))
    return tmp_path


def test_classes_sorted_by_frequency_with_hand_computed_probabilities(stats_root: Path) -> None:
    rcs = RareClassSampler(stats_root, temperature=0.1)
    assert rcs.classes.tolist() == [18, 0, 13]  # 4000 < 5500 < 7501
    # (1 - f_c) / T = 10 * (13001, 11501, 9500) / 17001 = 7.647197, 6.764896, 5.587907;
    # relative to the first: exp(0), exp(-0.882301) = 0.413832, exp(-2.059291) = 0.127545,
    # sum 1.541377 -> P = 0.648771, 0.268481, 0.082747.
    assert rcs.probs == pytest.approx([0.648771, 0.268481, 0.082747], abs=2e-6)
    assert list(rcs.probabilities) == [18, 0, 13]


def test_paper_temperature_peaks_on_the_rarest_class(stats_root: Path) -> None:
    rcs = RareClassSampler(stats_root)  # T = 0.01: differences 8.82301, 20.59291
    # P(13) = exp(-20.59291) / (1 + exp(-8.82301) + exp(-20.59291)) = 1.139e-9
    assert rcs.probs == pytest.approx([0.99985272, 1.4728255e-4, 1.13907e-9], rel=1e-5)


def test_candidates_need_strictly_more_than_min_pixels(stats_root: Path) -> None:
    rcs = RareClassSampler(stats_root, min_pixels=3000)
    # 00002 has exactly 3000 pixels of class 13: not a candidate.
    assert rcs.candidates == {
        18: ["00002_labelTrainIds.png"],
        0: ["00001_labelTrainIds.png"],
        13: ["00003_labelTrainIds.png"],
    }
    lower = RareClassSampler(stats_root, min_pixels=2999)
    assert lower.candidates[13] == ["00002_labelTrainIds.png", "00003_labelTrainIds.png"]


def test_crop_acceptance_threshold(stats_root: Path) -> None:
    rcs = RareClassSampler(stats_root, min_pixels=3000, min_crop_ratio=0.5)
    label = torch.full((50, 50), 255, dtype=torch.int64)
    label.view(-1)[:1500] = 13
    assert not rcs.accepts(label, 13)  # needs more than 3000 * 0.5 = 1500
    label.view(-1)[1500] = 13
    assert rcs.accepts(label, 13)
    assert not rcs.accepts(label.numpy(), 18)


def test_sampling_frequencies_follow_probabilities(stats_root: Path) -> None:
    rcs = RareClassSampler(stats_root, temperature=0.1, min_pixels=2999, seed=0)
    draws = [rcs.sample() for _ in range(2000)]
    classes = np.array([c for c, _ in draws])
    for c, p in rcs.probabilities.items():
        assert abs((classes == c).mean() - p) < 0.035
    files_13 = {f for c, f in draws if c == 13}
    assert files_13 == {"00002_labelTrainIds.png", "00003_labelTrainIds.png"}


def test_deterministic_and_resumable(stats_root: Path) -> None:
    a = RareClassSampler(stats_root, temperature=0.1, seed=7)
    b = RareClassSampler(stats_root, temperature=0.1, seed=7)
    first = [a.sample() for _ in range(10)]
    assert first == [b.sample() for _ in range(10)]
    shared = np.random.default_rng(7)  # the same stream, passed in explicitly
    assert first == [b.sample(shared) for _ in range(10)]
    state = a.state_dict()
    ahead = [a.sample() for _ in range(10)]
    c = RareClassSampler(stats_root, temperature=0.1, seed=123)
    c.load_state_dict(state)
    assert [c.sample() for _ in range(10)] == ahead
    # An explicit generator is used instead of the own one and leaves that untouched.
    rng_draws = [a.sample(np.random.default_rng(5)) for _ in range(3)]
    assert len(set(rng_draws)) == 1
    assert a.state_dict() == c.state_dict()


def test_available_filters_candidates(stats_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"classes \[13\].*min_pixels"):
        RareClassSampler(
            stats_root, available={"00001_labelTrainIds.png", "00002_labelTrainIds.png"}
        )


def test_class_without_candidate_is_a_clear_error(stats_root: Path) -> None:
    with pytest.raises(
        DatasetError, match=r"classes \[18, 0, 13\] have no file with more than 4000"
    ):
        RareClassSampler(stats_root, min_pixels=4000)


@pytest.mark.parametrize("missing", ["sample_class_stats.json", "samples_with_class.json"])
def test_missing_statistics_name_the_prepare_command(stats_root: Path, missing: str) -> None:
    (stats_root / missing).unlink()
    with pytest.raises(DatasetError, match=f"{missing}.*python -m ssr.data.prepare gta5"):
        RareClassSampler(stats_root)


def test_corrupt_statistics_file(stats_root: Path) -> None:
    (stats_root / "sample_class_stats.json").write_text('[{"0": 12')
    with pytest.raises(DatasetError, match="not valid JSON"):
        RareClassSampler(stats_root)


def test_class_probabilities_convert_string_keys() -> None:
    classes, probs = class_probabilities([{"5": 10, "file": "a"}, {"5": 10, "7": 30}], 1.0)
    assert classes.tolist() == [5, 7]
    # f = (0.4, 0.6); softmax(0.6, 0.4) = 1 / (1 + exp(-0.2)) = 0.549834
    assert probs == pytest.approx([0.549834, 0.450166], abs=1e-6)
