"""Shadow-branch export: `python -m ssr.export ckpt_path=... out=...` (docs/method.md §3.3).

SSR's SAM encoder and fusion layers, the EMA teacher and the ImageNet FD copy only shape training;
inference uses the student alone. This writes that student as a self-describing `ssr-segmentor`
file (weights + model config), which `ssr.eval` and `ssr.predict` load without `model=`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from ssr import CONF_PATH
from ssr.model.checkpoint import export_segmentor, load_segmentor
from ssr.run.cli import cli

log = logging.getLogger(__name__)


def export(ckpt_path: str | Path, out: str | Path, model_cfg: DictConfig | dict) -> dict[str, int]:
    """Load the student of any checkpoint format and write it to `out`.

    `model_cfg` describes the architecture only for checkpoints that store none (official
    work-dir files). Returns the parameter count and the file size in bytes.
    """
    segmentor, config, fmt = load_segmentor(ckpt_path, model_cfg, "cpu")
    meta = {"source": str(Path(ckpt_path).resolve()), "source_format": fmt, "network": "student"}
    export_segmentor(segmentor, out, model_config=config, meta=meta)
    return {
        "params": sum(p.numel() for p in segmentor.parameters()),
        "bytes": Path(out).stat().st_size,
    }


@hydra.main(config_path=CONF_PATH, config_name="export", version_base="1.3")
@cli
def main(cfg: DictConfig) -> None:
    stats = export(cfg.ckpt_path, cfg.out, cfg.model)
    table = Table(title="ssr.export: student (shadow branch)", show_header=False, min_width=40)
    table.add_row("source", str(cfg.ckpt_path))
    table.add_row("written", str(cfg.out))
    table.add_row("parameters", f"{stats['params']:,}")
    table.add_row("file size", f"{stats['bytes'] / 2**20:.1f} MiB")
    Console().print(table)


if __name__ == "__main__":
    main()
