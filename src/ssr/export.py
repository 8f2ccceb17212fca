"""Shadow-branch export: `python -m ssr.export ckpt_path=... out=... [format=onnx]`.

SSR's SAM encoder and fusion layers, the EMA teacher and the ImageNet FD copy only shape training
(docs/method.md §3.3); inference uses the student alone. This writes that student either as a
self-describing `ssr-segmentor` file (weights + model config) or as an ONNX model checked against
PyTorch with ONNX Runtime (`ssr.model.onnx`); `ssr.eval` and `ssr.predict` load both. An HRDA
student keeps its test protocol (docs/hrda.md §2.4) in either: through its model config, or as
ONNX metadata of a graph fixed to one test window.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from ssr import CONF_PATH
from ssr.errors import UserError
from ssr.io import CheckpointError
from ssr.model.checkpoint import export_segmentor, load_segmentor
from ssr.model.onnx import export_onnx
from ssr.run.cli import cli

FORMATS = ("torch", "onnx")

log = logging.getLogger(__name__)


def export(
    ckpt_path: str | Path,
    out: str | Path,
    model_cfg: DictConfig | dict,
    fmt: str = "auto",
    check_size: tuple[int, int] = (512, 1024),
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Load the student of any checkpoint format and write it to `out`.

    `model_cfg` describes the architecture only for checkpoints that store none (official
    work-dir files: model=daformer_mitbX or model=hrda_mitbX). `fmt`: "torch", "onnx", or "auto"
    (ONNX for a `.onnx` file name). `check_size` is where ONNX Runtime is checked; an HRDA model
    is exported and checked at its fixed test window instead (`ssr.model.onnx`). Returns the
    parameter count, the file size in bytes and, for ONNX, the ONNX Runtime check.
    """
    fmt = ("onnx" if Path(out).suffix == ".onnx" else "torch") if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt}; choose one of auto, {', '.join(FORMATS)}")
    if (fmt == "onnx") != (Path(out).suffix == ".onnx"):  # eval/predict pick loaders by suffix
        raise ExportError(
            f"format={fmt} but out={out}: ssr.eval and ssr.predict read *.onnx files as ONNX "
            "models and anything else as PyTorch files; name the file accordingly"
        )
    if Path(out).is_dir():  # before loading and tracing, not after
        raise ExportError(f"out={out} is a folder; name the file to write, e.g. {out}/model.pt")
    segmentor, config, source_format = load_segmentor(ckpt_path, model_cfg, "cpu")
    if source_format == "onnx":
        raise CheckpointError(f"{ckpt_path} is already an exported ONNX model")
    meta = {"source": Path(ckpt_path).name, "source_format": source_format}  # no local paths
    meta["network"] = "student"
    stats: dict[str, Any] = {"params": sum(p.numel() for p in segmentor.parameters())}
    if getattr(segmentor, "test_protocol", None):
        stats["test_protocol"] = segmentor.test_protocol  # HRDA: stored with the model
    if fmt == "onnx":
        stats["check"] = export_onnx(segmentor, out, meta, check_size, tolerance)
    else:
        export_segmentor(segmentor, out, model_config=config, meta=meta)
    return stats | {"format": fmt, "bytes": Path(out).stat().st_size}


class ExportError(UserError, ValueError):
    """An export setting that cannot work."""


@hydra.main(config_path=CONF_PATH, config_name="export", version_base="1.3")
@cli
def main(cfg: DictConfig) -> None:
    check_size = tuple(cfg.onnx_check_size)
    stats = export(cfg.ckpt_path, cfg.out, cfg.model, cfg.format, check_size, cfg.onnx_tolerance)
    table = Table(title="ssr.export: student (shadow branch)", show_header=False, min_width=40)
    table.add_row("source", str(cfg.ckpt_path))
    table.add_row("written", f"{cfg.out} ({stats['format']})")
    table.add_row("parameters", f"{stats['params']:,}")
    table.add_row("file size", f"{stats['bytes'] / 2**20:.1f} MiB")
    if "test_protocol" in stats:
        (h, w), (sh, sw) = stats["test_protocol"]["crop_size"], stats["test_protocol"]["stride"]
        fixed = f"; ONNX input fixed to {h}x{w}" if stats["format"] == "onnx" else ""
        table.add_row("test protocol", f"HRDA: slide {h}x{w}, stride {sh}x{sw}{fixed}")
    if "check" in stats:
        check = stats["check"]
        h, w = check["check_size"]
        table.add_row(
            "ONNX Runtime check",
            f"{h}x{w}: max |Δlogit| {check['max_abs_diff']:.1e}, "
            f"argmax differs at {check['argmax_mismatch']} of {check['pixels']:,} pixels (ties)",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
