"""Extra raw dataset formats of the synthetic scenes: SYNTHIA, ACDC and Dark Zurich.

Opt-in (`generate(..., benchmarks=...)`, CLI `--benchmarks`): they let the loaders, the
preparation and the test-server export of those benchmarks run end to end on CPU. Each is written
in the nested layout of the original downloads, at 1/8 of the real resolution:

* `synthia/`: `RGB/0000000.png` (source style, 160x95) and `GT/LABELS/0000000.png`, a 16-bit
  3-channel PNG: R = SYNTHIA class id, G = instance id (1000 + a counter, so 8-bit decoding
  fails), B = 0. Terrain, truck and train, which SYNTHIA lacks, and ignore are void (0); lane
  markings are SYNTHIA's own class 22 (ignored in training).
* `acdc/`: `rgb_anon/{cond}/{split}/GOPRxxxx/GOPRxxxx_frame_NNNNNN_rgb_anon.png` and, for train
  and val, `gt/{cond}/{split}/GOPRxxxx/GOPRxxxx_frame_NNNNNN_gt_labelTrainIds.png` (train ids);
  cond in fog, night, rain, snow; target style plus the condition's look; 240x135.
* `dark_zurich/`: `rgb_anon/train/{night,day}/GOPRxxxx/...` (unlabelled, like the real ones),
  `rgb_anon/val/night/GOPR0356/...` with `gt/val/night/GOPR0356/..._gt_labelTrainIds.png`, and
  `rgb_anon/test/night/GOPR0364/...`; night look for night, the plain target style for day.

Counts, with S = num_source, T = num_target_train and V = num_target_val, small next to the
GTA5/Cityscapes sets: SYNTHIA S (it replaces GTA5 as the source); ACDC per condition train
max(1, T // 4), val and test max(1, V // 4); Dark Zurich train night T, train day max(1, T // 4),
val V, test max(1, V // 4). Every sequence name is unique, so stems are unique across
conditions, splits and both benchmarks (the test-server export flattens them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ssr.data.labels import SYNTHIA_ID_TO_TRAIN_ID, THING_CLASSES, label_ids_to_train_ids
from ssr.data.synthetic.canvas import Lid, Mat, Scene
from ssr.data.synthetic.layout import sample_scene
from ssr.data.synthetic.style import SOURCE_STYLE, TARGET_STYLE, render
from ssr.io import atomic_write, atomic_write_png

BENCHMARKS: tuple[str, ...] = ("synthia", "acdc", "darkzurich")  # the order of the marker
BENCHMARK_DIRS: dict[str, str] = {"synthia": "synthia", "acdc": "acdc", "darkzurich": "dark_zurich"}
SYNTHIA_SIZE: tuple[int, int] = (95, 160)  # (H, W): SYNTHIA's 1280x760 / 8
ADVERSE_SIZE: tuple[int, int] = (135, 240)  # (H, W): ACDC's and Dark Zurich's 1920x1080 / 8
ACDC_CONDITIONS: tuple[str, ...] = ("fog", "night", "rain", "snow")
SYNTHIA_LANE_ID = 22  # SYNTHIA's lane marking class: not a training class, so ignored
SYNTHIA_VOID_TRAIN_IDS: tuple[int, ...] = (9, 14, 16)  # terrain, truck, train: never in SYNTHIA
_SPLITS = ("train", "val", "test")
# Random stream per (benchmark, look): second element of the SeedSequence key; 0 and 1 are the
# GTA5 and Cityscapes samples (`make_sample`), so no new sample shares their streams. Fixed
# numbers, not positions in a tuple, so adding a format never changes another one's images.
_STREAMS: dict[tuple[str, str], int] = {
    ("synthia", "source"): 2,
    ("acdc", "fog"): 3,
    ("acdc", "night"): 4,
    ("acdc", "rain"): 5,
    ("acdc", "snow"): 6,
    ("darkzurich", "day"): 7,
    ("darkzurich", "night"): 8,
}
# Dark Zurich's sequences per (split, time of day); val and test are the real ones' names.
_DZ_SEQUENCES: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "night"): ("GOPR0348", "GOPR0349"),
    ("train", "day"): ("GOPR0351",),
    ("val", "night"): ("GOPR0356",),
    ("test", "night"): ("GOPR0364",),
}


@dataclass(frozen=True)
class FormatJob:
    """One image of an extra format; `label` is None where the real set has no ground truth
    (test splits, Dark Zurich's train)."""

    benchmark: str
    look: str  # "source" (SYNTHIA), "day", or an adverse condition (fog, night, rain, snow)
    split: str
    index: int
    image: Path
    label: Path | None


def _synthia_lut() -> np.ndarray:
    """(256,) Cityscapes label id -> SYNTHIA id; void (0) for what SYNTHIA has no class for."""
    train_to_synthia = np.zeros(256, dtype=np.uint16)
    for synthia_id, train_id in SYNTHIA_ID_TO_TRAIN_ID.items():
        if train_id not in SYNTHIA_VOID_TRAIN_IDS:
            train_to_synthia[train_id] = synthia_id
    return train_to_synthia[label_ids_to_train_ids(np.arange(256, dtype=np.uint8))]


def synthia_label(scene: Scene) -> np.ndarray:
    """SYNTHIA's raw label as OpenCV writes it: (H, W, 3) uint16 BGR, [..., 2] the class id,
    [..., 1] the instance id (each connected region of a thing class: 1000, 1001, ...)."""
    classes = _synthia_lut()[scene.label]
    classes[scene.material == Mat.LANE] = SYNTHIA_LANE_ID
    instances = np.zeros_like(classes)
    train_ids = label_ids_to_train_ids(scene.label)
    counter = 1000
    for train_id in THING_CLASSES:
        mask = (train_id == train_ids) & (classes != 0)
        if not mask.any():
            continue
        n, regions = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        instances[mask] = counter + regions[mask] - 1
        counter += n - 1
    return np.stack([np.zeros_like(classes), instances, classes], axis=-1)


def _grey(img: np.ndarray) -> np.ndarray:
    """(H, W) luma of an (H, W, 3) float32 RGB image, for desaturating."""
    return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def apply_condition(
    image: np.ndarray, scene: Scene, look: str, rng: np.random.Generator
) -> np.ndarray:
    """An adverse-condition look on a target-style (H, W, 3) uint8 render; "day" keeps it.

    Cheap global changes, enough for a visible and class-dependent shift: fog hazes towards grey,
    more so higher up (a depth proxy) and in the sky; night is dark, bluish and noisy with lit
    lamps; rain is darker, greyer, with streaks; snow is brighter with whitish ground.
    """
    if look == "day":
        return image
    h, w = scene.label.shape
    img = image.astype(np.float32)
    grey = _grey(img)[..., None]
    sky = (scene.label == Lid.SKY)[..., None]
    if look == "fog":
        rows = np.linspace(1.0, 0.0, h, dtype=np.float32)[:, None, None]  # 1 at the top
        haze = np.where(sky, 0.9, np.clip(rng.uniform(0.25, 0.4) + 0.5 * rows, 0.0, 0.9))
        img = img * (1 - haze) + rng.uniform(185, 210) * haze
    elif look == "night":
        img = (0.5 * img + 0.5 * grey) * rng.uniform(0.15, 0.25)
        img = np.where(sky, np.array([10, 12, 28], np.float32), img * np.float32([0.8, 0.9, 1.3]))
        lamps = np.isin(
            scene.material, (Mat.LAMP_RED, Mat.LAMP_AMBER, Mat.LAMP_GREEN, Mat.TAIL_LIGHT)
        )
        img[lamps] = image[lamps]
        img = img + rng.uniform(3.0, 6.0) * rng.standard_normal(img.shape, dtype=np.float32)
    elif look == "rain":
        img = (0.6 * img + 0.4 * grey) * rng.uniform(0.65, 0.8)
        drops = (rng.random((h, w)) < 0.004).astype(np.float32) * rng.uniform(50, 90)
        streaks = cv2.filter2D(drops, -1, np.eye(7, dtype=np.float32)[::-1].copy())
        img = img + streaks[..., None]
    elif look == "snow":
        ground = np.isin(scene.label, (Lid.SIDEWALK, Lid.TERRAIN, Lid.VEGETATION))[..., None]
        road = (scene.label == Lid.ROAD)[..., None]
        cover = np.where(ground, 0.7, np.where(road, 0.35, 0.0))
        img = (img * (1 - cover) + 238 * cover) * rng.uniform(1.05, 1.15)
        img[rng.random((h, w)) < 0.003] = 250  # flakes
    else:
        raise ValueError(f"unknown condition {look!r}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_format_sample(
    benchmark: str, look: str, split: str, index: int, seed: int = 0
) -> tuple[np.ndarray, Scene]:
    """One (image (H, W, 3) uint8, scene) of an extra format; its label is derived from the scene.

    Deterministic per (seed, benchmark, look, split, index); separate streams from `make_sample`.
    """
    if (benchmark, look) not in _STREAMS or split not in _SPLITS:
        raise ValueError(f"no synthetic {benchmark}/{look}/{split} images")
    key = [seed, _STREAMS[benchmark, look], _SPLITS.index(split), index]
    layout_seq, look_seq = np.random.SeedSequence(key).spawn(2)
    size = SYNTHIA_SIZE if benchmark == "synthia" else ADVERSE_SIZE
    scene = sample_scene(np.random.default_rng(layout_seq), *size)
    rng = np.random.default_rng(look_seq)
    if benchmark == "synthia":
        return render(scene, SOURCE_STYLE, rng), scene
    return apply_condition(render(scene, TARGET_STYLE, rng), scene, look, rng), scene


def _sequence_jobs(
    root: Path, benchmark: str, look: str, split: str, count: int, where: Path,
    sequences: tuple[str, ...], labelled: bool,
) -> list[FormatJob]:  # fmt: skip
    """ACDC/Dark Zurich frames of one part, in contiguous blocks per sequence."""
    jobs = []
    for i in range(count):
        seq = sequences[i * len(sequences) // count]
        stem = f"{seq}_frame_{10 * i + 1:06d}"
        image = root / "rgb_anon" / where / seq / f"{stem}_rgb_anon.png"
        label = root / "gt" / where / seq / f"{stem}_gt_labelTrainIds.png"
        jobs.append(FormatJob(benchmark, look, split, i, image, label if labelled else None))
    return jobs


def format_jobs(
    out: Path, benchmark: str, num_source: int, num_target_train: int, num_target_val: int
) -> list[FormatJob]:
    """Every image of one extra format under `out`, with the counts of the module docstring."""
    root = out / BENCHMARK_DIRS[benchmark]
    few_train, few_val = max(1, num_target_train // 4), max(1, num_target_val // 4)
    if benchmark == "synthia":
        names = [f"{i:07d}.png" for i in range(num_source)]
        return [
            FormatJob("synthia", "source", "train", i, root / "RGB" / n, root / "GT" / "LABELS" / n)
            for i, n in enumerate(names)
        ]
    jobs = []
    if benchmark == "acdc":
        for c, cond in enumerate(ACDC_CONDITIONS):
            for s, (split, count) in enumerate(
                (("train", few_train), ("val", few_val), ("test", few_val))
            ):
                seqs = tuple(f"GOPR{500 + 100 * c + 10 * s + k:04d}" for k in range(2))
                where = Path(cond) / split
                labelled = split != "test"
                jobs += _sequence_jobs(root, benchmark, cond, split, count, where, seqs, labelled)
        return jobs
    if benchmark == "darkzurich":
        for split, look, count in (
            ("train", "night", num_target_train),
            ("train", "day", few_train),
            ("val", "night", num_target_val),
            ("test", "night", few_val),
        ):
            where = Path(split) / look
            seqs = _DZ_SEQUENCES[split, look]
            labelled = split == "val"  # Dark Zurich labels only its val frames
            jobs += _sequence_jobs(root, benchmark, look, split, count, where, seqs, labelled)
        return jobs
    raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")


def _save_synthia_label(path: Path, bgr: np.ndarray) -> None:
    """A 16-bit 3-channel PNG, which Pillow cannot write: OpenCV's encoder, so the array is BGR
    (the class id in index 2 = the PNG's R channel); atomic, not fsynced (a rerun remakes it)."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"OpenCV cannot encode {path.name} as PNG")
    atomic_write(path, lambda f: f.write(data.tobytes()), durable=False)


def write_format_job(job: FormatJob, seed: int) -> None:
    """Render one sample and write its image and, where the split has one, its raw label."""
    image, scene = make_format_sample(job.benchmark, job.look, job.split, job.index, seed)
    atomic_write_png(job.image, image)
    if job.label is None:
        return
    if job.benchmark == "synthia":
        _save_synthia_label(job.label, synthia_label(scene))
    else:
        atomic_write_png(job.label, label_ids_to_train_ids(scene.label))
