"""Training data stream speed at paper sizes: samples/s of one loader worker, original files vs a
pre-resized copy (`python -m ssr.data.prepare ... --resized`), measured side by side.

Builds a small GTA5 -> Cityscapes pair at the real frame sizes (GTA5 1914x1052, Cityscapes
2048x1024) from the synthetic scenes, upsampled with photo-like noise so the PNGs cost what real
ones do to decode, prepares it, writes the copies at the paper's resizes (1280x720, 1024x512),
then times `UDATrainDataset[i]` — decode, resize, RCS crop, flip, normalise, for a source and a
target crop — in this process (one worker's rate), alternating original and copy sample by
sample. The same samples must come out identical (checked). Results:
benchmarks/results/data_stream.json.

Run: python benchmarks/data_stream.py [--frames 8] [--samples 24]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ssr.data.datamodule import UDADataModule
from ssr.data.prepare import main as prepare_main
from ssr.data.synthetic.style import make_sample
from ssr.data.synthetic.writer import gta_label_image
from ssr.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
GTA_SIZE, CS_SIZE = (1052, 1914), (1024, 2048)  # (H, W)
SOURCE_SCALE, TARGET_SCALE = (1280, 720), (1024, 512)


def photo(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A synthetic frame at a real size with sensor-like noise (a real PNG's decoding cost)."""
    big = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    return np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)


def write_pair(root: Path, frames: int) -> None:
    """GTA5 (palette labels of label ids) and Cityscapes (labelIds) trees at the real sizes."""
    rng = np.random.default_rng(0)
    for folder in ("gta/images", "gta/labels"):
        (root / folder).mkdir(parents=True)
    for i in range(frames):
        image, ids = make_sample("source", "train", i)
        Image.fromarray(photo(image, GTA_SIZE, rng)).save(root / f"gta/images/{i:05d}.png")
        big = cv2.resize(ids, (GTA_SIZE[1], GTA_SIZE[0]), interpolation=cv2.INTER_NEAREST)
        gta_label_image(big).save(root / f"gta/labels/{i:05d}.png")
    for split, count in (("train", frames), ("val", 1)):
        for i in range(count):
            image, ids = make_sample("target", split, i)
            stem = f"bench_{i:06d}_000019"
            for kind, array in (("leftImg8bit", photo(image, CS_SIZE, rng)), ("gtFine", ids)):
                folder = root / "cityscapes" / kind / split / "bench"
                folder.mkdir(parents=True, exist_ok=True)
                if kind == "gtFine":
                    array = cv2.resize(array, CS_SIZE[::-1], interpolation=cv2.INTER_NEAREST)
                name = f"{stem}_gtFine_labelIds.png" if kind == "gtFine" else f"{stem}_{kind}.png"
                Image.fromarray(array).save(folder / name)


def build(root: Path, source: str, target: str) -> UDADataModule:
    dm = UDADataModule(
        str(root / source), str(root / target), source_resize=SOURCE_SCALE,
        target_resize=TARGET_SCALE, test_resize=TARGET_SCALE, num_workers=0, seed=0,
        rcs={"min_pixels": 3000},
    )  # fmt: skip
    dm.setup("fit")
    return dm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="frames per domain")
    parser.add_argument("--samples", type=int, default=24, help="timed samples per variant")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data_stream.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker's share of the machine
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_pair(root, args.frames)
        for fmt, name, scale in (
            ("gta5", "gta", SOURCE_SCALE),
            ("cityscapes", "cityscapes", TARGET_SCALE),
        ):
            argv = [fmt, str(root / name), "--nproc", "1", "--resized", str(root / f"{name}_r")]
            if prepare_main([*argv, "--scale", *map(str, scale)]) != 0:
                return 1
        sizes = {
            name: sum(p.stat().st_size for p in (root / name).rglob("*.png") if not p.is_symlink())
            for name in ("gta", "gta_r", "cityscapes", "cityscapes_r")
        }
        variants = {
            "original": build(root, "gta", "cityscapes"),
            "resized": build(root, "gta_r", "cityscapes_r"),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(args.samples + 1):  # sample 0 warms up
            items = {}
            for name, dm in variants.items():
                start = time.perf_counter()
                items[name] = dm.train_set[i]
                if i:
                    times[name].append(time.perf_counter() - start)
            a, b = items["original"], items["resized"]
            if not all(torch.equal(a[k], b[k]) for k in ("src_img", "src_lbl", "tgt_img")):
                print(f"sample {i}: the copy gave other pixels", file=sys.stderr)
                return 1
    rates = {name: 1.0 / statistics.median(t) for name, t in times.items()}
    result = {
        "what": "UDATrainDataset[i] (source + target crop) in one process = one loader worker",
        "frame_sizes_hw": {"gta5": GTA_SIZE, "cityscapes": CS_SIZE},
        "scales": {"source": SOURCE_SCALE, "target": TARGET_SCALE},
        "frames_per_domain": args.frames,
        "samples": args.samples,
        "median_s": {name: statistics.median(t) for name, t in times.items()},
        "samples_per_s_per_worker": rates,
        "speedup": rates["resized"] / rates["original"],
        "png_bytes": sizes,
        "identical_samples": True,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "torch": torch.__version__,
    }
    atomic_write_json(args.out, result)
    print(
        f"one worker: original {rates['original']:.2f} samples/s, pre-resized "
        f"{rates['resized']:.2f} samples/s ({result['speedup']:.2f}x), identical -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
