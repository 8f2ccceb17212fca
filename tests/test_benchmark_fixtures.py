"""The benchmark loaders on real files (../shared/fixtures, research-only, never copied here): a
real 16-bit SYNTHIA label, a corrupted ACDC label, and a public MIC Dark Zurich test export."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssr.data.files import DatasetError, read_label
from ssr.data.raw_labels import read_channel16
from ssr.submission import palette_png

from helpers import prepare_fails

SYNTHIA_SEQS = "synthia/TWJianNuo_Synthia_3D_scenen_reconstruction/000000_label.png"
MOOSS_LABEL = "acdc/echigot_MOOSS/labels/GOPR0475_frame_000049_gtFine_labelTrainIds.png"
MIC_DZ_EXPORT = (
    "dark_zurich/Siddharth-Shrivastava7_Diffusion_conditional_prior_segmentation/"
    "diffusion_plug_prior_mod/MIC_mod/seg/labelTrainIds/GOPR0356_frame_000330_rgb_anon.png"
)


def test_real_synthia_label_needs_the_16_bit_decoder(shared_fixtures: Path) -> None:
    """A real SYNTHIA GT/LABELS frame (SYNTHIA-SEQS: the same encoding as RAND-CITYSCAPES, another
    class table): OpenCV's R channel holds its classes and G its car instances; Pillow sees 0."""
    path = shared_fixtures / SYNTHIA_SEQS
    classes = read_channel16(path, channel=2)  # R
    instances = read_channel16(path, channel=1)  # G
    assert classes.shape == (760, 1280) and classes.dtype == np.uint16
    assert np.unique(classes).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9, 12]
    assert set(np.unique(instances[instances > 0]).tolist()) <= set(range(193, 206))
    assert (classes[instances > 0] == 8).all()  # instances only on cars (SEQS class 8)
    with Image.open(path) as im:
        assert im.mode == "RGB" and not np.asarray(im).any()  # silently all zero


def test_a_label_resized_with_interpolation_is_refused(
    shared_fixtures: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real ACDC label resized by interpolation (edge values like 67, 203) is not a train-id map:
    reading it and preparing a dataset with it both name the file and the value."""
    label = shared_fixtures / MOOSS_LABEL
    with pytest.raises(DatasetError, match=r"holds value \d+, not a train id \(0\.\.18 or 255\)"):
        read_label(label)
    root = tmp_path / "acdc"
    stem = "GOPR0475_frame_000049"
    for folder in ("rgb_anon", "gt"):  # the val split of all four conditions; one frame in fog
        for condition in ("fog", "night", "rain", "snow"):
            (root / folder / condition / "val" / "GOPR0475").mkdir(parents=True)
    image = root / "rgb_anon" / "fog" / "val" / "GOPR0475" / f"{stem}_rgb_anon.png"
    Image.new("RGB", (1024, 512)).save(image)
    copied = root / "gt" / "fog" / "val" / "GOPR0475" / f"{stem}_gt_labelTrainIds.png"
    shutil.copy(label, copied)
    prepare_fails(["acdc", str(root), "--nproc", "1"], capsys, str(copied), "not a train id")


def test_our_export_is_what_a_public_dark_zurich_submission_holds(shared_fixtures: Path) -> None:
    """MIC's published Dark Zurich export file: a 1920x1080 palette PNG of train ids with the 19
    Cityscapes colours. Ours, from the same ids, decodes to the same mode, size, colours, ids."""
    with Image.open(shared_fixtures / MIC_DZ_EXPORT) as theirs:
        ids = np.asarray(theirs)
        their_palette = theirs.getpalette()[:57]
        assert theirs.mode == "P" and theirs.size == (1920, 1080)
    with Image.open(io.BytesIO(palette_png(ids))) as ours:
        assert ours.mode == "P" and ours.size == (1920, 1080)
        assert ours.getpalette()[:57] == their_palette
        np.testing.assert_array_equal(np.asarray(ours), ids)
