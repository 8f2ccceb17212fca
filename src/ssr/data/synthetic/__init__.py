"""Synthetic GTA5 -> Cityscapes domain-shift dataset: procedural street scenes, two renderers.

The source set is written in GTA5's raw on-disk format (palette PNG labels whose index is the
Cityscapes label id) and the target set in raw Cityscapes format (`*_gtFine_labelIds.png`), see
docs/method.md §7.2–§7.4, so `python -m ssr.data.prepare` converts them exactly like the real data.
The scene layout is sampled independently of the domain; only the appearance differs (palette,
texture, blur, lighting, sensor noise), which is the gap that UDA has to close. On request the
same kind of scenes are also written in raw SYNTHIA, ACDC and Dark Zurich format (`--benchmarks`),
so those benchmarks' loaders, preparation and export can be tested on CPU.

`canvas` holds the label ids, materials and drawing primitives, `objects` the street objects,
`layout` the scene sampler, `style` the two domains' renderer, `formats` the extra benchmark
formats and `writer` the files and the CLI (`python -m ssr.data.synthetic OUT`).
"""

from ssr.data.synthetic.canvas import Lid, Mat, Scene
from ssr.data.synthetic.formats import BENCHMARK_DIRS, BENCHMARKS, make_format_sample
from ssr.data.synthetic.layout import sample_scene
from ssr.data.synthetic.style import (
    SOURCE_SIZE,
    SOURCE_STYLE,
    TARGET_SIZE,
    TARGET_STYLE,
    DomainStyle,
    make_sample,
    render,
)
from ssr.data.synthetic.writer import (
    FORMAT_VERSION,
    GTA_LABEL_PALETTE,
    MARKER_NAME,
    TRAIN_CITIES,
    VAL_CITIES,
    SyntheticDataError,
    generate,
    generate_prepared,
    main,
)

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_DIRS",
    "FORMAT_VERSION",
    "GTA_LABEL_PALETTE",
    "MARKER_NAME",
    "SOURCE_SIZE",
    "SOURCE_STYLE",
    "TARGET_SIZE",
    "TARGET_STYLE",
    "TRAIN_CITIES",
    "VAL_CITIES",
    "DomainStyle",
    "Lid",
    "Mat",
    "Scene",
    "SyntheticDataError",
    "generate",
    "generate_prepared",
    "main",
    "make_format_sample",
    "make_sample",
    "render",
    "sample_scene",
]
