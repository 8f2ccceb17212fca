"""Drawing primitives of the synthetic scenes: label ids, materials, the canvas, object frames.

A scene is painted as three aligned layers (label id, material, per-instance variant) so that the
layout is fixed before any domain's appearance is chosen; see `layout.sample_scene`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


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


@dataclass(frozen=True)
class Scene:
    """One street layout: label ids, materials and per-instance variants, all (H, W) uint8."""

    label: np.ndarray
    material: np.ndarray
    variant: np.ndarray


class Canvas:
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


# An object drawer: (canvas, ground x, ground row, pixels per metre, rng), see `objects`.
Drawer = Callable[[Canvas, float, float, float, np.random.Generator], None]


def variant(rng: np.random.Generator) -> int:
    """A random instance variant: the renderer derives the instance's colour from it."""
    return int(rng.integers(256))


class Frame:
    """Object-local drawing in metres: x to the right (mirrored when d = -1), y up from the
    ground point (cx, yb); u is pixels per metre at the object's depth."""

    def __init__(self, cv: Canvas, cx: float, yb: float, u: float, lid: int, d: int = 1):
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


def side(rng: np.random.Generator) -> int:
    """A random side of the street or facing direction: -1 or +1."""
    return 1 if rng.random() < 0.5 else -1
