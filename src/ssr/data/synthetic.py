"""Synthetic GTA5 -> Cityscapes domain-shift dataset: procedural street scenes, two renderers.

The source set is written in GTA5's raw on-disk format (palette PNG labels whose index is the
Cityscapes label id) and the target set in raw Cityscapes format (`*_gtFine_labelIds.png`), see
ALGORITHM.md §7.2–§7.4, so `python -m ssr.data.prepare` converts them exactly like the real data.
The scene layout is sampled independently of the domain; only the appearance differs (palette,
texture, blur, lighting, sensor noise), which is the gap that UDA has to close.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress

# GTA5 label palette: index = Cityscapes label id 0..34 (note "static" is (20, 20, 20) in GTA5,
# unlike cityscapesScripts' (0, 0, 0)); the remaining 221 entries of the PNG palette are black.
GTA_LABEL_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (20, 20, 20), (111, 74, 0), (81, 0, 81),
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
    (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
    (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
    (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32), (0, 0, 142),
)  # fmt: skip

SOURCE_SIZE: tuple[int, int] = (176, 320)  # (H, W): GTA5's 1914x1052 aspect, small
TARGET_SIZE: tuple[int, int] = (128, 256)  # (H, W): Cityscapes' 2:1 aspect, small
TRAIN_CITIES: tuple[str, ...] = ("pixelstadt", "synthburg")  # sorted: file order = index
VAL_CITIES: tuple[str, ...] = ("renderdorf", "shaderhausen")
MARKER_NAME = "synthetic.json"  # written first (complete=false) and last (complete=true)
FORMAT_VERSION = 1  # bump when the rendered output changes, so old folders are not reused


class SyntheticDataError(RuntimeError):
    """Bad output folder or arguments for the synthetic dataset generator."""


class Lid(IntEnum):
    """Cityscapes label ids the scenes use (the first four are not evaluated: train id 255)."""

    UNLABELED = 0
    EGO_VEHICLE = 1
    OUT_OF_ROI = 3
    STATIC = 4
    ROAD = 7
    SIDEWALK = 8
    BUILDING = 11
    WALL = 12
    FENCE = 13
    POLE = 17
    TRAFFIC_LIGHT = 19
    TRAFFIC_SIGN = 20
    VEGETATION = 21
    TERRAIN = 22
    SKY = 23
    PERSON = 24
    RIDER = 25
    CAR = 26
    TRUCK = 27
    BUS = 28
    MOTORCYCLE = 32
    BICYCLE = 33


class Mat(IntEnum):
    """Surface materials: what the renderer colours; several materials share one label."""

    SKY = 0
    DISTANT = 1
    FACADE = 2
    WINDOW = 3
    WALL = 4
    FENCE = 5
    ROAD = 6
    LANE = 7
    SIDEWALK = 8
    TERRAIN = 9
    FOLIAGE = 10
    TRUNK = 11
    POLE = 12
    SIGN = 13
    LIGHT_BOX = 14
    LAMP_OFF = 15
    LAMP_RED = 16
    LAMP_AMBER = 17
    LAMP_GREEN = 18
    CAR_BODY = 19
    GLASS = 20
    TYRE = 21
    TAIL_LIGHT = 22
    PLATE = 23
    TRUCK_BODY = 24
    BUS_BODY = 25
    SKIN = 26
    SHIRT = 27
    TROUSERS = 28
    BIKE_FRAME = 29
    MOTO_BODY = 30
    STATIC = 31
    CLUTTER = 32
    EGO = 33
    BORDER = 34


# Domain-neutral colours per material; a material with several colours picks one per instance.
_BASE_COLOURS: dict[Mat, tuple[tuple[int, int, int], ...]] = {
    Mat.SKY: ((100, 155, 225),),
    Mat.DISTANT: ((165, 158, 150),),
    Mat.FACADE: (
        (185, 160, 135), (160, 115, 95), (205, 198, 180), (140, 140, 152), (195, 172, 115),
    ),
    Mat.WINDOW: ((55, 75, 105),),
    Mat.WALL: ((172, 165, 150),),
    Mat.FENCE: ((150, 128, 105),),
    Mat.ROAD: ((88, 86, 94),),
    Mat.LANE: ((232, 232, 222),),
    Mat.SIDEWALK: ((188, 168, 176),),
    Mat.TERRAIN: ((155, 172, 88),),
    Mat.FOLIAGE: ((58, 128, 48),),
    Mat.TRUNK: ((98, 72, 48),),
    Mat.POLE: ((122, 126, 132),),
    Mat.SIGN: ((30, 80, 200), (210, 40, 40), (240, 200, 30), (238, 238, 238)),
    Mat.LIGHT_BOX: ((42, 46, 40),),
    Mat.LAMP_OFF: ((70, 70, 62),),
    Mat.LAMP_RED: ((240, 50, 40),),
    Mat.LAMP_AMBER: ((250, 180, 30),),
    Mat.LAMP_GREEN: ((50, 220, 120),),
    Mat.CAR_BODY: (
        (200, 30, 30), (30, 60, 160), (230, 230, 230), (40, 40, 45), (150, 150, 156),
        (20, 110, 60), (220, 180, 40),
    ),
    Mat.GLASS: ((38, 48, 60),),
    Mat.TYRE: ((25, 25, 25),),
    Mat.TAIL_LIGHT: ((205, 20, 20),),
    Mat.PLATE: ((235, 235, 225),),
    Mat.TRUCK_BODY: ((235, 235, 230), (120, 90, 60), (200, 120, 40), (90, 110, 130)),
    Mat.BUS_BODY: ((230, 200, 30), (200, 40, 40), (240, 240, 240), (40, 120, 200)),
    Mat.SKIN: ((230, 190, 160), (190, 140, 100), (120, 80, 55)),
    Mat.SHIRT: (
        (200, 50, 50), (40, 80, 170), (230, 230, 230), (30, 30, 30), (60, 140, 70),
        (240, 200, 40), (150, 60, 150),
    ),
    Mat.TROUSERS: ((40, 50, 80), (30, 30, 30), (110, 100, 90), (60, 60, 70)),
    Mat.BIKE_FRAME: ((180, 30, 30), (30, 30, 30), (40, 90, 180), (200, 200, 200)),
    Mat.MOTO_BODY: ((30, 30, 30), (200, 30, 30), (30, 60, 160)),
    Mat.STATIC: ((90, 110, 90),),
    Mat.CLUTTER: ((120, 110, 100),),
    Mat.EGO: ((50, 52, 58),),
    Mat.BORDER: ((0, 0, 0),),
}  # fmt: skip


@dataclass(frozen=True)
class DomainStyle:
    """How one domain looks. Ranges are (low, high) of a per-image uniform draw.

    `overrides` replace a material's neutral colours before the global palette shift;
    `textures` rows are (material, fine noise, blotchy noise, horizontal stripes, diagonal
    stripes) amplitudes in 0-255 units; materials not listed are flat.
    """

    name: str
    saturation: float
    hue_deg: float
    contrast: float
    cast: tuple[float, float, float]
    instance_jitter: float
    overrides: tuple[tuple[Mat, tuple[tuple[int, int, int], ...]], ...] = ()
    textures: tuple[tuple[Mat, float, float, float, float], ...] = ()
    stripe_period: float = 3.0
    brightness: tuple[float, float] = (1.0, 1.0)
    gamma: tuple[float, float] = (1.0, 1.0)
    vignette: tuple[float, float] = (0.0, 0.0)
    blur_sigma: tuple[float, float] = (0.0, 0.0)
    noise_sigma: tuple[float, float] = (0.0, 0.0)
    cast_jitter: float = 0.0


# Game-like: saturated, contrasty, flat and clean, evenly lit, sharp.
SOURCE_STYLE = DomainStyle(
    name="source",
    saturation=1.25,
    hue_deg=0.0,
    contrast=1.05,
    cast=(1.0, 1.0, 1.0),
    instance_jitter=0.05,
    brightness=(0.95, 1.08),
)

# Real-like: dull, hue-shifted and tinted palette, textured surfaces, variable exposure and
# gamma, vignetting, optical blur and sensor noise. Relative colours (sky blue, vegetation
# green, road darker than sidewalk) survive, so classes stay recognisable by shape and context.
TARGET_STYLE = DomainStyle(
    name="target",
    saturation=0.85,
    hue_deg=-8.0,
    contrast=0.9,
    cast=(1.03, 1.0, 0.96),
    instance_jitter=0.15,
    overrides=((Mat.SKY, ((108, 158, 240),)),),  # paler, hazier sky
    textures=(
        (Mat.SKY, 2.0, 8.0, 0.0, 0.0),
        (Mat.DISTANT, 4.0, 10.0, 0.0, 0.0),
        (Mat.FACADE, 6.0, 8.0, 18.0, 0.0),
        (Mat.WINDOW, 4.0, 6.0, 0.0, 0.0),
        (Mat.WALL, 8.0, 14.0, 0.0, 0.0),
        (Mat.FENCE, 4.0, 0.0, 0.0, 30.0),
        (Mat.ROAD, 10.0, 8.0, 0.0, 0.0),
        (Mat.SIDEWALK, 8.0, 4.0, 0.0, 12.0),
        (Mat.TERRAIN, 10.0, 18.0, 0.0, 0.0),
        (Mat.FOLIAGE, 14.0, 22.0, 0.0, 0.0),
        (Mat.TRUNK, 6.0, 0.0, 10.0, 0.0),
        (Mat.CAR_BODY, 4.0, 6.0, 0.0, 0.0),
        (Mat.TRUCK_BODY, 4.0, 6.0, 8.0, 0.0),
        (Mat.BUS_BODY, 4.0, 6.0, 0.0, 0.0),
        (Mat.SHIRT, 5.0, 0.0, 0.0, 0.0),
        (Mat.TROUSERS, 5.0, 0.0, 0.0, 0.0),
    ),
    brightness=(0.85, 1.1),
    gamma=(0.9, 1.15),
    vignette=(0.1, 0.3),
    blur_sigma=(0.4, 0.9),
    noise_sigma=(2.0, 6.0),
    cast_jitter=0.05,
)


@dataclass(frozen=True)
class Scene:
    """One street layout: label ids, materials and per-instance variants, all (H, W) uint8."""

    label: np.ndarray
    material: np.ndarray
    variant: np.ndarray


class _Canvas:
    """Label/material/variant layers with vectorised painting on clipped bounding boxes."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.label = np.full((height, width), Lid.SKY, dtype=np.uint8)
        self.material = np.full((height, width), Mat.SKY, dtype=np.uint8)
        self.variant = np.zeros((height, width), dtype=np.uint8)

    def box(self, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice] | None:
        iy0, iy1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), self.h)
        ix0, ix1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), self.w)
        if iy0 >= iy1 or ix0 >= ix1:
            return None
        return slice(iy0, iy1), slice(ix0, ix1)

    def grid(self, box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates of a box: ys (h, 1), xs (1, w)."""
        ys = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + 0.5
        return ys, xs

    def paint(
        self, box: tuple[slice, slice], mask: np.ndarray | None, lid: int, mat: int, var: int = 0
    ) -> None:
        for layer, value in ((self.label, lid), (self.material, mat), (self.variant, var)):
            view = layer[box]
            if mask is None:
                view[...] = value
            else:
                view[mask] = value

    def rect(
        self, y0: float, y1: float, x0: float, x1: float, lid: int, mat: int, var: int = 0
    ) -> None:
        # Rounded edges, at least one pixel thick, so thin far-away poles never vanish.
        iy0, ix0 = round(y0), round(x0)
        iy1, ix1 = max(round(y1), iy0 + 1), max(round(x1), ix0 + 1)
        box = self.box(iy0, iy1, ix0, ix1)
        if box is not None:
            self.paint(box, None, lid, mat, var)

    def ellipse(
        self,
        cy: float,
        cx: float,
        ry: float,
        rx: float,
        lid: int,
        mat: int,
        var: int = 0,
        inner: float = 0.0,
    ) -> None:
        """Filled ellipse; `inner` > 0 leaves a hole of that relative radius (a ring)."""
        ry, rx = max(ry, 0.6), max(rx, 0.6)
        box = self.box(cy - ry, cy + ry, cx - rx, cx + rx)
        if box is None:
            return
        ys, xs = self.grid(box)
        r2 = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2
        mask = r2 <= 1.0
        if inner > 0:
            mask &= r2 >= inner**2
        self.paint(box, mask, lid, mat, var)

    def polygon(self, pts: Sequence[tuple[float, float]], lid: int, mat: int, var: int = 0) -> None:
        """Even-odd fill of (x, y) vertices, tested at pixel centres."""
        px = np.array([p[0] for p in pts], dtype=np.float32)
        py = np.array([p[1] for p in pts], dtype=np.float32)
        box = self.box(py.min(), py.max(), px.min(), px.max())
        if box is None:
            return
        ys, xs = self.grid(box)
        inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
        for i in range(len(pts)):
            x1, y1, x2, y2 = px[i - 1], py[i - 1], px[i], py[i]
            if y1 == y2:
                continue
            crosses = (y1 > ys) != (y2 > ys)  # (h, 1)
            x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)  # (h, 1)
            inside ^= crosses & (xs < x_at)
        if inside.any():
            self.paint(box, inside, lid, mat, var)

    def line(
        self,
        p0: tuple[float, float],
        p1: tuple[float, float],
        width: float,
        lid: int,
        mat: int,
        var: int = 0,
    ) -> None:
        """A thick segment between two (x, y) points, at least one pixel wide."""
        dx, dy = p1[0] - p0[0], p1[1] - p0[1]
        norm = max(float(np.hypot(dx, dy)), 1e-6)
        half = max(width, 1.0) / 2
        nx, ny = -dy / norm * half, dx / norm * half
        self.polygon(
            [
                (p0[0] + nx, p0[1] + ny),
                (p1[0] + nx, p1[1] + ny),
                (p1[0] - nx, p1[1] - ny),
                (p0[0] - nx, p0[1] - ny),
            ],
            lid,
            mat,
            var,
        )


_Drawer = Callable[[_Canvas, float, float, float, np.random.Generator], None]


def _variant(rng: np.random.Generator) -> int:
    return int(rng.integers(256))


class _Obj:
    """Object-local drawing in metres: x to the right (mirrored when d = -1), y up from the
    ground point (cx, yb); u is pixels per metre at the object's depth."""

    def __init__(self, cv: _Canvas, cx: float, yb: float, u: float, lid: int, d: int = 1):
        self.cv, self.cx, self.yb, self.u, self.lid, self.d = cv, cx, yb, u, lid, d

    def _pt(self, p: tuple[float, float]) -> tuple[float, float]:
        return self.cx + self.d * p[0] * self.u, self.yb - p[1] * self.u

    def rect(self, x0: float, x1: float, y0: float, y1: float, mat: int, var: int = 0) -> None:
        (ax, ay), (bx, by) = self._pt((x0, y0)), self._pt((x1, y1))
        self.cv.rect(min(ay, by), max(ay, by), min(ax, bx), max(ax, bx), self.lid, mat, var)

    def poly(self, pts: Sequence[tuple[float, float]], mat: int, var: int = 0) -> None:
        self.cv.polygon([self._pt(p) for p in pts], self.lid, mat, var)

    def ellipse(self, x: float, y: float, rx: float, ry: float, mat: int, var: int = 0,
                inner: float = 0.0) -> None:  # fmt: skip
        (px, py), u = self._pt((x, y)), self.u
        self.cv.ellipse(py, px, ry * u, rx * u, self.lid, mat, var, inner)

    def line(self, p0: tuple[float, float], p1: tuple[float, float], width: float, mat: int,
             var: int = 0) -> None:  # fmt: skip
        self.cv.line(self._pt(p0), self._pt(p1), width * self.u, self.lid, mat, var)


def _side(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


# ---- objects: each is drawn at a ground point (cx, yb) with u = pixels per metre at that depth


def _draw_car(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Rear view: tyres, body, cabin, rear window, tail lights, plate (all labelled car)."""
    w, h, v = 1.8 * rng.uniform(0.9, 1.15), 1.45 * rng.uniform(0.9, 1.1), _variant(rng)
    o = _Obj(cv, cx, yb, u, Lid.CAR)
    for s in (-1, 1):
        o.rect((0.38 * s - 0.08) * w, (0.38 * s + 0.08) * w, 0, 0.22 * h, Mat.TYRE)
    o.rect(-0.5 * w, 0.5 * w, 0.12 * h, 0.62 * h, Mat.CAR_BODY, v)
    o.poly([(-0.46 * w, 0.6 * h), (0.46 * w, 0.6 * h), (0.36 * w, h), (-0.36 * w, h)],
           Mat.CAR_BODY, v)  # fmt: skip
    o.poly([(-0.4 * w, 0.64 * h), (0.4 * w, 0.64 * h), (0.33 * w, 0.94 * h),
            (-0.33 * w, 0.94 * h)], Mat.GLASS)  # fmt: skip
    for s in (-1, 1):
        o.rect((0.42 * s - 0.06) * w, (0.42 * s + 0.06) * w, 0.45 * h, 0.55 * h, Mat.TAIL_LIGHT)
    o.rect(-0.12 * w, 0.12 * w, 0.25 * h, 0.35 * h, Mat.PLATE)


def _draw_truck(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Side view: chassis, cargo box, cab with a window, wheels; the cab faces +x."""
    n, h = 5.5 * rng.uniform(0.85, 1.1), 3.0 * rng.uniform(0.9, 1.1)  # length, height
    o = _Obj(cv, cx, yb, u, Lid.TRUCK, _side(rng))
    o.rect(-n / 2, n / 2, 0.1 * h, 0.22 * h, Mat.TYRE)
    o.rect(-n / 2, 0.23 * n, 0.2 * h, h, Mat.TRUCK_BODY, _variant(rng))
    o.rect(0.25 * n, n / 2, 0.2 * h, 0.72 * h, Mat.TRUCK_BODY, _variant(rng))
    o.rect(0.29 * n, 0.46 * n, 0.46 * h, 0.68 * h, Mat.GLASS)
    for fx in (-0.38, -0.2, 0.35):
        o.ellipse(fx * n, 0.45, 0.45, 0.45, Mat.TYRE)


def _draw_bus(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Side view: long body with a band of windows, wheels."""
    n, h = 7.0 * rng.uniform(0.85, 1.05), 3.0 * rng.uniform(0.95, 1.05)  # length, height
    o = _Obj(cv, cx, yb, u, Lid.BUS)
    o.rect(-n / 2, n / 2, 0.1 * h, h, Mat.BUS_BODY, _variant(rng))
    windows = int(rng.integers(5, 9))
    pitch = 0.94 * n / windows
    for i in range(windows):
        x = -0.47 * n + i * pitch
        o.rect(x, x + 0.82 * pitch, 0.55 * h, 0.9 * h, Mat.GLASS)
    for fx in (-0.33, 0.3):
        o.ellipse(fx * n, 0.5, 0.5, 0.5, Mat.TYRE)


def _draw_person(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Standing pedestrian: legs, torso, arms, head."""
    hp = 1.75 * rng.uniform(0.88, 1.1)
    shirt, trousers, skin = _variant(rng), _variant(rng), _variant(rng)
    o = _Obj(cv, cx, yb, u, Lid.PERSON)
    stride = rng.uniform(0.0, 0.14)
    for s in (-1, 1):
        o.line((0.05 * s * hp, 0.47 * hp), (s * stride * hp, 0), 0.09 * hp, Mat.TROUSERS, trousers)
    o.poly([(-0.13 * hp, 0.82 * hp), (0.13 * hp, 0.82 * hp), (0.1 * hp, 0.45 * hp),
            (-0.1 * hp, 0.45 * hp)], Mat.SHIRT, shirt)  # fmt: skip
    swing = rng.uniform(-0.06, 0.06)
    for s in (-1, 1):
        o.line((0.12 * s * hp, 0.8 * hp), ((0.16 * s + swing) * hp, 0.5 * hp), 0.06 * hp,
               Mat.SHIRT, shirt)  # fmt: skip
    o.ellipse(0, 0.91 * hp, 0.06 * hp, 0.075 * hp, Mat.SKIN, skin)


def _draw_seated_rider(o: _Obj, hip: tuple[float, float], foot: tuple[float, float],
                       hand: tuple[float, float], rng: np.random.Generator) -> None:  # fmt: skip
    """A rider on a two-wheeler, drawn in the vehicle's frame `o` but labelled rider."""
    shirt, trousers, skin = _variant(rng), _variant(rng), _variant(rng)
    o = _Obj(o.cv, o.cx, o.yb, o.u, Lid.RIDER, o.d)
    shoulder = (hip[0] + 0.3, hip[1] + 0.62)
    knee = (hip[0] + 0.35, hip[1] - 0.25)
    o.line(hip, knee, 0.16, Mat.TROUSERS, trousers)
    o.line(knee, foot, 0.13, Mat.TROUSERS, trousers)
    o.line(hip, shoulder, 0.3, Mat.SHIRT, shirt)
    o.line(shoulder, hand, 0.1, Mat.SHIRT, shirt)
    o.ellipse(shoulder[0] + 0.06, shoulder[1] + 0.2, 0.12, 0.14, Mat.SKIN, skin)


def _draw_bicycle(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator,
                  ridden: bool = False) -> None:  # fmt: skip
    """Side view bicycle: two tyres and a frame; `ridden` puts a rider on it."""
    o = _Obj(cv, cx, yb, u, Lid.BICYCLE, _side(rng))
    r = 0.34
    rear, front, bracket = (-0.55, r), (0.55, r), (0.0, r)
    seat, head, bar = (-0.18, 0.95), (0.42, 0.95), (0.47, 1.1)
    for hub in (rear, front):
        o.ellipse(*hub, r, r, Mat.TYRE, inner=0.78)
    frame = _variant(rng)
    for a, b in ((rear, bracket), (bracket, seat), (seat, rear), (seat, head), (bracket, head),
                 (head, front), (head, bar)):  # fmt: skip
        o.line(a, b, 0.07, Mat.BIKE_FRAME, frame)
    if ridden:
        _draw_seated_rider(o, (seat[0], seat[1] + 0.05), (bracket[0], 0.2), bar, rng)


def _draw_ridden_bicycle(cv: _Canvas, cx: float, yb: float, u: float,
                         rng: np.random.Generator) -> None:  # fmt: skip
    _draw_bicycle(cv, cx, yb, u, rng, ridden=True)


def _draw_motorcycle(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Side view motorcycle (tyres, body, fork) with its rider."""
    o = _Obj(cv, cx, yb, u, Lid.MOTORCYCLE, _side(rng))
    r = 0.36
    for x in (-0.7, 0.7):
        o.ellipse(x, r, r, r, Mat.TYRE, inner=0.5)
    body = _variant(rng)
    o.ellipse(0, 1.55 * r, 0.7, 0.28, Mat.MOTO_BODY, body)
    o.line((0.7, r), (0.5, 1.0), 0.09, Mat.BIKE_FRAME, body)
    _draw_seated_rider(o, (-0.2, 0.95), (0.1, 0.35), (0.5, 1.05), rng)


def _draw_pole(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """A pole, optionally with a traffic light on top and/or a traffic sign."""
    ph = 4.2 * rng.uniform(0.9, 1.15)
    pw = max(1.0 / u, 0.14)  # at least one pixel
    _Obj(cv, cx, yb, u, Lid.POLE).rect(-pw / 2, pw / 2, 0, ph, Mat.POLE, _variant(rng))
    has_light = rng.random() < 0.4
    if has_light:
        o = _Obj(cv, cx, yb, u, Lid.TRAFFIC_LIGHT)
        bw, bh = 0.38, 0.95
        top = ph + 0.2 * bh
        o.rect(-bw / 2, bw / 2, top - bh, top, Mat.LIGHT_BOX, _variant(rng))
        lit = int(rng.integers(3))
        lamps = ((0.18, Mat.LAMP_RED), (0.5, Mat.LAMP_AMBER), (0.82, Mat.LAMP_GREEN))
        for i, (frac, mat) in enumerate(lamps):
            o.ellipse(0, top - frac * bh, 0.12, 0.12, mat if i == lit else Mat.LAMP_OFF)
    if rng.random() < (0.35 if has_light else 0.6):
        o = _Obj(cv, cx, yb, u, Lid.TRAFFIC_SIGN)
        s = 0.65 * rng.uniform(0.85, 1.2)
        y = ph * (rng.uniform(0.55, 0.7) if has_light else rng.uniform(0.78, 0.95))
        v, shape = _variant(rng), int(rng.integers(3))
        if shape == 0:
            o.rect(-s / 2, s / 2, y - s / 2, y + s / 2, Mat.SIGN, v)
        elif shape == 1:
            o.ellipse(0, y, s / 2, s / 2, Mat.SIGN, v)
        else:  # a yield triangle, point down
            o.poly([(-s / 2, y + s / 2), (s / 2, y + s / 2), (0, y - s / 2)], Mat.SIGN, v)


def _draw_tree(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Trunk and a crown of overlapping ellipses (Cityscapes labels both vegetation)."""
    th = 2.2 * rng.uniform(0.8, 1.3)
    o = _Obj(cv, cx, yb, u, Lid.VEGETATION)
    o.rect(-0.13, 0.13, 0, th, Mat.TRUNK, _variant(rng))
    v = _variant(rng)
    for _ in range(int(rng.integers(3, 6))):
        r = rng.uniform(0.8, 1.4)
        y, x = th + 0.8 + rng.normal(0, 0.5), rng.normal(0, 0.6)
        o.ellipse(x, y, r, r * rng.uniform(0.8, 1.1), Mat.FOLIAGE, v)


def _draw_bin(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Street furniture labelled "static" (not evaluated)."""
    w, h = 0.5 * rng.uniform(0.8, 1.4), 0.9 * rng.uniform(0.8, 1.3)
    _Obj(cv, cx, yb, u, Lid.STATIC).rect(-w / 2, w / 2, 0, h, Mat.STATIC, _variant(rng))


def _draw_clutter(cv: _Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """An unidentifiable blob labelled "unlabeled" (not evaluated)."""
    r = 0.4 * rng.uniform(0.7, 1.5)
    _Obj(cv, cx, yb, u, Lid.UNLABELED).ellipse(0, r, r * rng.uniform(1.0, 2.0), r, Mat.CLUTTER)


# Optional band in front of a side's facades: cumulative odds, then (material, height in metres).
_FRONT_ODDS = ((0.15, Lid.WALL), (0.3, Lid.FENCE), (0.45, Lid.VEGETATION))
_FRONT_BANDS = {
    Lid.WALL: (Mat.WALL, 1.5),
    Lid.FENCE: (Mat.FENCE, 1.2),
    Lid.VEGETATION: (Mat.FOLIAGE, 1.0),
}


def sample_scene(rng: np.random.Generator, height: int, width: int) -> Scene:
    """Sample one street layout; the distribution is the same for both domains.

    A perspective street: horizon at `yh`, vanishing point `xv`, road / sidewalk / terrain
    bounded by lines converging at the vanishing point, building facades (with windows, and
    sometimes a wall, fence or hedge in front) on both sides, then objects painted far to near.
    """
    h, w = height, width
    cv = _Canvas(h, w)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5  # (H, 1)
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5  # (1, W)
    yh, xv = h * rng.uniform(0.36, 0.5), w * rng.uniform(0.4, 0.6)
    g = h - yh  # ground rows below the horizon
    depth = np.clip((ys - yh) / g, 0.0, None)  # (H, 1): 0 at the horizon, 1 at the bottom row
    below = ys > yh

    # Ground lines (x at the horizon, x at the bottom row) on each side, sd = -1 left / +1 right.
    lines: dict[tuple[str, int], tuple[float, float]] = {}
    for sd in (-1, 1):
        road = xv + sd * w * rng.uniform(0.45, 0.8)
        walk = road + sd * w * rng.uniform(0.12, 0.35)
        lines["road", sd] = (xv + sd * 0.01 * w, road)
        lines["walk", sd] = (xv + sd * 0.02 * w, walk)
        lines["outer", sd] = lines["walk", sd]
        if rng.random() < 0.45:  # a terrain strip between the sidewalk and the facades
            lines["outer", sd] = (xv + sd * 0.025 * w, walk + sd * w * rng.uniform(0.1, 0.3))

    def line_x(key: str, sd: int, t: np.ndarray | float) -> np.ndarray | float:
        top, bottom = lines[key, sd]
        return top + (bottom - top) * t

    # Distant buildings or trees at the end of the street.
    far_h, far_w = h * rng.uniform(0.03, 0.12), w * rng.uniform(0.1, 0.3)
    far_is_building = rng.random() < 0.7
    cv.rect(
        yh - far_h,
        yh + 1,
        xv - far_w,
        xv + far_w,
        Lid.BUILDING if far_is_building else Lid.VEGETATION,
        Mat.DISTANT if far_is_building else Mat.FOLIAGE,
        _variant(rng),
    )

    # Facades: each side split into buildings with their own roof slope and window grid.
    for sd in (-1, 1):
        out_top, out_bottom = lines["outer", sd]
        n = int(rng.integers(2, 6))
        cuts = np.sort(rng.uniform(0.0, 1.0, n - 1)) ** 0.6  # denser towards the vanishing point
        edges = np.concatenate([[0.0], cuts, [1.0]])
        front = rng.random()  # one optional band in front of this side's facades
        front_kind = next((k for p, k in _FRONT_ODDS if front < p), None)
        for i in range(n):
            # segment in distance-from-vanishing-point units, 0 = far end, 1 = image border
            a0, a1 = edges[i], edges[i + 1]
            px0, px1 = (
                (xv - a1 * xv, xv - a0 * xv) if sd < 0 else (xv + a0 * (w - xv), xv + a1 * (w - xv))
            )
            box = cv.box(0, h, px0, px1)
            if box is None:
                continue
            bx = xs[:, box[1]]  # (1, w_seg)
            dist = np.abs(bx - xv) / w  # horizontal distance from the vanishing point
            roof = yh - h * rng.uniform(0.25, 1.5) * dist  # (1, w_seg)
            # facade base = where the outer ground line passes this column (may be off-image)
            base = yh + g * (bx - out_top) / (out_bottom - out_top)
            mask = (ys >= roof) & (ys < np.maximum(base, yh))
            if not mask.any():
                continue
            cv.paint(box, mask, Lid.BUILDING, Mat.FACADE, _variant(rng))
            # windows: a grid in facade coordinates (a across, b down), so rows converge
            a = (bx - px0) / max(px1 - px0, 1e-3)
            b = (ys - roof) / np.maximum(base - roof, 1e-3)
            cols, rows = int(rng.integers(2, 7)), int(rng.integers(3, 9))
            fa, fb = np.modf(a * cols)[0], np.modf(b * rows)[0]
            win = mask & (fa > 0.25) & (fa < 0.75) & (fb > 0.25) & (fb < 0.7) & (b < 0.82)
            if win.any():
                cv.paint(box, win, Lid.BUILDING, Mat.WINDOW, _variant(rng))
            if front_kind is not None:
                mat, metres = _FRONT_BANDS[front_kind]
                # (base - yh) / 2 is pixels per metre at the facade's foot (see the objects)
                height = metres * (base - yh) / 2 * (1 + 0.15 * np.sin(bx * rng.uniform(0.2, 0.6)))
                front_mask = mask & (ys >= base - height)
                cv.paint(box, front_mask, front_kind, mat, _variant(rng))

    # Ground: road between the road lines, sidewalks, then terrain out to the facades.
    full = (slice(0, h), slice(0, w))
    left = {k: line_x(k, -1, depth) for k in ("road", "walk", "outer")}
    right = {k: line_x(k, 1, depth) for k in ("road", "walk", "outer")}
    ground_v = _variant(rng)
    cv.paint(
        full,
        below & (xs >= left["outer"]) & (xs < right["outer"]),
        Lid.TERRAIN,
        Mat.TERRAIN,
        _variant(rng),
    )
    cv.paint(
        full,
        below & (xs >= left["walk"]) & (xs < right["walk"]),
        Lid.SIDEWALK,
        Mat.SIDEWALK,
        _variant(rng),
    )
    cv.paint(
        full, below & (xs >= left["road"]) & (xs < right["road"]), Lid.ROAD, Mat.ROAD, ground_v
    )
    # Lane markings (label road): a dashed centre line; dash length grows with depth.
    centre = (line_x("road", -1, depth) + line_x("road", 1, depth)) / 2
    half = 0.012 * w * depth
    dashed = np.modf(2.0 / np.maximum(depth, 1e-3))[0] < 0.5
    cv.paint(full, below & dashed & (np.abs(xs - centre) < half), Lid.ROAD, Mat.LANE, ground_v)

    # Objects, each (depth t, drawer, ground x); painted far to near so nearer ones occlude.
    objects: list[tuple[float, _Drawer, float]] = []

    def at(kind: str, sd: int, f: float, t: float) -> float:
        """x on the ground at depth t, fraction f from the `kind` line towards the road line."""
        return line_x(kind, sd, t) + f * (line_x("road", sd, t) - line_x(kind, sd, t))

    def on_road(t: float, f: float) -> float:
        return line_x("road", -1, t) + f * (line_x("road", 1, t) - line_x("road", -1, t))

    for _ in range(int(rng.poisson(2.2))):
        t = rng.uniform(0.12, 0.85)
        f = rng.uniform(0.12, 0.88) if rng.random() < 0.7 else rng.choice([0.05, 0.95])
        objects.append((t, _draw_car, on_road(t, f)))
    if rng.random() < 0.2:
        t = rng.uniform(0.15, 0.6)
        objects.append((t, _draw_truck, on_road(t, rng.choice([0.1, 0.9]))))
    if rng.random() < 0.13:
        t = rng.uniform(0.15, 0.6)
        objects.append((t, _draw_bus, on_road(t, rng.choice([0.12, 0.88]))))
    for _ in range(int(rng.poisson(1.8))):
        t = rng.uniform(0.12, 0.8)
        objects.append((t, _draw_person, at("walk", _side(rng), rng.uniform(0.15, 0.85), t)))
    if rng.random() < 0.22:
        t = rng.uniform(0.2, 0.8)
        objects.append((t, _draw_ridden_bicycle, on_road(t, rng.choice([0.1, 0.9]))))
    if rng.random() < 0.15:
        t = rng.uniform(0.15, 0.7)
        objects.append((t, _draw_bicycle, at("walk", _side(rng), rng.uniform(0.1, 0.4), t)))
    if rng.random() < 0.12:
        t = rng.uniform(0.2, 0.8)
        objects.append((t, _draw_motorcycle, on_road(t, rng.uniform(0.15, 0.85))))
    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0.1, 0.75)
        objects.append((t, _draw_pole, at("walk", _side(rng), rng.uniform(0.7, 0.92), t)))
    if rng.random() < 0.65:
        for _ in range(int(rng.integers(1, 4))):
            t = rng.uniform(0.1, 0.7)
            objects.append((t, _draw_tree, at("outer", _side(rng), rng.uniform(0.05, 0.4), t)))
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 3))):
            t = rng.uniform(0.15, 0.8)
            objects.append((t, _draw_bin, at("walk", _side(rng), rng.uniform(0.1, 0.5), t)))
    if rng.random() < 0.3:
        t = rng.uniform(0.05, 0.4)
        objects.append((t, _draw_clutter, at("outer", _side(rng), rng.uniform(0.0, 0.5), t)))

    for t, drawer, x in sorted(objects, key=lambda o: o[0]):
        yb, u = yh + t * g, t * g / 2.0  # ground row and pixels per metre at this depth
        drawer(cv, x, yb, u, rng)

    # Non-evaluated regions that real labels have: the ego car's bonnet and an out-of-ROI frame.
    if rng.random() < 0.25:
        eh = h * rng.uniform(0.06, 0.14)
        hood = ys > h - eh * (1 - 0.6 * ((xs - w / 2) / (w / 2)) ** 2)
        cv.paint(full, hood, Lid.EGO_VEHICLE, Mat.EGO, _variant(rng))
    if rng.random() < 0.25:
        k = max(1, round(0.012 * h))
        frame = np.zeros((h, w), dtype=bool)
        frame[:k], frame[-k:], frame[:, :k], frame[:, -k:] = True, True, True, True
        cv.paint(full, frame, Lid.OUT_OF_ROI, Mat.BORDER)
    return Scene(cv.label, cv.material, cv.variant)


# ---- rendering


def _restyle(rgb: np.ndarray, style: DomainStyle) -> np.ndarray:
    """Shift (N, 3) colours: hue rotation about the grey axis, saturation, contrast, cast."""
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float64)
    chroma = rgb - lum[:, None]
    theta = np.deg2rad(style.hue_deg)
    k = np.full(3, 1 / np.sqrt(3))
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rot = np.cos(theta) * np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * np.outer(k, k)
    out = lum[:, None] + style.saturation * chroma @ rot.T
    out = 128 + style.contrast * (out - 128)
    return np.clip(out * np.asarray(style.cast), 0, 255)


@cache
def _style_tables(style: DomainStyle) -> tuple[np.ndarray, np.ndarray]:
    """(materials, 256, 3) colour per (material, variant) and (materials, 4) texture amplitudes."""
    n_mat = len(Mat)
    lut = np.zeros((n_mat, 256, 3), dtype=np.float64)
    v = np.arange(256)
    # A second, decorrelated hash of the variant scales brightness per instance.
    jitter = 1 + style.instance_jitter * 2 * (((v * 97) % 256) / 255 - 0.5)
    for mat, colours in {**_BASE_COLOURS, **dict(style.overrides)}.items():
        palette = np.asarray(colours, dtype=np.float64)
        lut[mat] = palette[v % len(palette)] * jitter[:, None]
    lut = _restyle(lut.reshape(-1, 3), style).reshape(n_mat, 256, 3).astype(np.float32)
    amps = np.zeros((n_mat, 4), dtype=np.float32)
    for mat, *row in style.textures:
        amps[mat] = row
    return lut, amps


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, ...) float array with edge padding."""
    if sigma <= 0:
        return img
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        out = np.zeros_like(img)
        for i, tap in enumerate(taps):
            out += tap * np.take(padded, np.arange(i, i + n), axis=axis)
        img = out
    return img


def _blotches(rng: np.random.Generator, h: int, w: int, cell: int = 8) -> np.ndarray:
    """Smooth low-frequency noise (H, W), unit-ish variance: bilinear upsampled coarse noise."""
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR))


def render(scene: Scene, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Render a scene in one domain's appearance -> (H, W, 3) uint8 RGB."""
    h, w = scene.label.shape
    lut, amps = _style_tables(style)
    img = lut[scene.material, scene.variant]  # (H, W, 3)
    amp = amps[scene.material]  # (H, W, 4)
    if amp.any():
        ys = np.arange(h, dtype=np.float32)[:, None]
        xs = np.arange(w, dtype=np.float32)[None, :]
        period = style.stripe_period
        texture = (
            amp[..., 0] * rng.standard_normal((h, w), dtype=np.float32)
            + amp[..., 1] * _blotches(rng, h, w)
            + amp[..., 2] * np.sin(2 * np.pi * ys / period)
            + amp[..., 3] * np.sin(2 * np.pi * (xs + ys) / (1.5 * period))
        )
        img = img + texture[..., None]
    img = _gaussian_blur(img, rng.uniform(*style.blur_sigma))
    # Exposure, response curve, colour temperature and lens falloff.
    img = np.clip(img / 255.0, 0.0, 1.0) ** rng.uniform(*style.gamma)
    cast = 1 + rng.uniform(-style.cast_jitter, style.cast_jitter, 3)
    img = img * (255.0 * rng.uniform(*style.brightness)) * cast.astype(np.float32)
    strength = rng.uniform(*style.vignette)
    if strength > 0:
        ry = (np.arange(h, dtype=np.float32)[:, None] + 0.5) / h * 2 - 1
        rx = (np.arange(w, dtype=np.float32)[None, :] + 0.5) / w * 2 - 1
        img = img * (1 - strength * (rx**2 + ry**2) / 2)[..., None]
    sigma = rng.uniform(*style.noise_sigma)
    if sigma > 0:
        img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_sample(
    domain: str, split: str, index: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One (image (H, W, 3) uint8, label ids (H, W) uint8) pair of the dataset.

    Deterministic per (seed, domain, split, index), independent of how many images are made;
    the layout and the appearance use separate random streams.
    """
    if domain not in ("source", "target") or split not in ("train", "val"):
        raise ValueError(f"domain must be source/target and split train/val, got {domain}/{split}")
    style, (h, w) = (
        (SOURCE_STYLE, SOURCE_SIZE) if domain == "source" else (TARGET_STYLE, TARGET_SIZE)
    )
    key = [seed, ("source", "target").index(domain), ("train", "val").index(split), index]
    layout_seq, look_seq = np.random.SeedSequence(key).spawn(2)
    scene = sample_scene(np.random.default_rng(layout_seq), h, w)
    image = render(scene, style, np.random.default_rng(look_seq))
    return image, scene.label


# ---- writing


def _save_png(image: Image.Image, path: Path) -> None:
    """Write next to the target and rename, so an interrupted run never leaves half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SyntheticDataError(f"cannot write {path}: {e.strerror or e}") from e


def _gta_label_image(label: np.ndarray) -> Image.Image:
    image = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
    palette = [c for rgb in GTA_LABEL_PALETTE for c in rgb]
    image.putpalette(palette + [0] * (768 - len(palette)))
    return image


def _jobs(
    out: Path, num_source: int, num_target_train: int, num_target_val: int
) -> list[tuple[str, str, int, Path, Path]]:
    """(domain, split, index, image path, label path) for every image to write."""
    jobs = []
    gta = out / "gta"
    for i in range(num_source):
        name = f"{i + 1:05d}.png"
        jobs.append(("source", "train", i, gta / "images" / name, gta / "labels" / name))
    cs = out / "cityscapes"
    for split, count, cities in (
        ("train", num_target_train, TRAIN_CITIES),
        ("val", num_target_val, VAL_CITIES),
    ):
        for i in range(count):
            city = cities[i * len(cities) // count]  # contiguous blocks per city
            stem = f"{city}_{i:06d}_000019"
            jobs.append(
                (
                    "target",
                    split,
                    i,
                    cs / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                    cs / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                )
            )
    return jobs


def _check_out(out: Path, params: dict, force: bool) -> bool:
    """Decide what to do with OUT: True = generate into it, False = already generated."""
    if out.exists() and not out.is_dir():
        raise SyntheticDataError(f"output path {out} exists and is not a directory; pass a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return True
    marker = out / MARKER_NAME
    try:
        previous = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):
        previous = {}  # an unreadable marker of ours: treat as an interrupted run
    if previous is None:
        for sub in ("gta", "cityscapes"):
            if (out / sub).exists():
                raise SyntheticDataError(
                    f"{out / sub} exists but was not written by ssr.data.synthetic (no "
                    f"{MARKER_NAME}); refusing to touch it, choose an empty output folder"
                )
        if force:
            return True
        raise SyntheticDataError(
            f"output folder {out} is not empty; choose an empty or new folder (or pass --force)"
        )
    if previous.get("complete") and {k: previous.get(k) for k in params} == params and not force:
        return False
    if not force:
        what = "other settings" if previous.get("complete") else "an interrupted run"
        raise SyntheticDataError(
            f"{out} holds a synthetic dataset from {what}; pass --force to regenerate it"
        )
    for sub in ("gta", "cityscapes"):
        if (out / sub).exists():
            try:
                shutil.rmtree(out / sub)
            except OSError as e:
                raise SyntheticDataError(f"cannot delete {out / sub}: {e.strerror or e}") from e
    return True


def _write_marker(out: Path, params: dict, complete: bool) -> None:
    tmp = out / f".{MARKER_NAME}.tmp"
    try:
        tmp.write_text(json.dumps({**params, "complete": complete}, indent=2) + "\n")
        os.replace(tmp, out / MARKER_NAME)
    except OSError as e:
        raise SyntheticDataError(f"cannot write {out / MARKER_NAME}: {e.strerror or e}") from e


def _write_job(job: tuple[str, str, int, Path, Path], seed: int) -> None:
    domain, split, index, image_path, label_path = job
    image, label = make_sample(domain, split, index, seed)
    _save_png(Image.fromarray(image), image_path)
    label_image = _gta_label_image(label) if domain == "source" else Image.fromarray(label)
    _save_png(label_image, label_path)


def generate(
    out: Path | str,
    seed: int = 0,
    num_source: int = 200,
    num_target_train: int = 100,
    num_target_val: int = 50,
    force: bool = False,
    progress: bool = False,
) -> bool:
    """Write the synthetic source (GTA5 format) and target (Cityscapes format) sets under `out`.

    Returns False, writing nothing, when `out` already holds a complete set made with the same
    settings; an existing non-empty `out` is otherwise refused unless `force` (which deletes only
    the `gta/` and `cityscapes/` folders a previous run of this generator wrote).
    """
    out = Path(out)
    for name, count in (
        ("num_source", num_source),
        ("num_target_train", num_target_train),
        ("num_target_val", num_target_val),
    ):
        if count < 1:
            raise SyntheticDataError(f"{name} must be at least 1, got {count}")
    params = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "num_source": num_source,
        "num_target_train": num_target_train,
        "num_target_val": num_target_val,
        "source_size_hw": list(SOURCE_SIZE),
        "target_size_hw": list(TARGET_SIZE),
    }
    if not _check_out(out, params, force):
        return False
    jobs = _jobs(out, num_source, num_target_train, num_target_val)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for folder in sorted({p.parent for job in jobs for p in job[3:]}):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SyntheticDataError(
            f"cannot create folders under {out}: {e.strerror or e}; choose a writable folder"
        ) from e
    _write_marker(out, params, complete=False)
    if progress:
        with Progress(console=Console(stderr=True), transient=False) as bar:
            task = bar.add_task("rendering synthetic scenes", total=len(jobs))
            for job in jobs:
                _write_job(job, seed)
                bar.advance(task)
    else:
        for job in jobs:
            _write_job(job, seed)
    _write_marker(out, params, complete=True)
    return True


def positive_int(text: str) -> int:
    """argparse type for the image counts: an empty split would break the loaders."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: `python -m ssr.data.synthetic OUT [--seed 0] [--num-source 200] ... [--force]`."""
    parser = argparse.ArgumentParser(
        prog="python -m ssr.data.synthetic",
        description="Write the synthetic GTA5-format source and Cityscapes-format target sets.",
    )
    parser.add_argument("out", type=Path, help="output folder (gets gta/ and cityscapes/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-source", type=positive_int, default=200)
    parser.add_argument("--num-target-train", type=positive_int, default=100)
    parser.add_argument("--num-target-val", type=positive_int, default=50)
    parser.add_argument("--force", action="store_true", help="regenerate a previous output")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        written = generate(
            args.out,
            args.seed,
            args.num_source,
            args.num_target_train,
            args.num_target_val,
            force=args.force,
            progress=True,
        )
    except SyntheticDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not written:
        print(f"{args.out} already holds this synthetic dataset; nothing to do (--force redoes it)")
        return 0
    total = args.num_source + args.num_target_train + args.num_target_val
    print(
        f"wrote {total} images in {time.perf_counter() - start:.1f}s: {args.out / 'gta'} "
        f"({args.num_source}, GTA5 format) and {args.out / 'cityscapes'} "
        f"({args.num_target_train} train + {args.num_target_val} val, Cityscapes format)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
