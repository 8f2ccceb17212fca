"""Scene layout: one perspective street, sampled independently of the domain it is rendered in."""

from __future__ import annotations

import numpy as np

from ssr.data.synthetic.canvas import Canvas, Drawer, Lid, Mat, Scene, side, variant
from ssr.data.synthetic.objects import (
    draw_bicycle,
    draw_bin,
    draw_bus,
    draw_car,
    draw_clutter,
    draw_motorcycle,
    draw_person,
    draw_pole,
    draw_ridden_bicycle,
    draw_tree,
    draw_truck,
)

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
    cv = Canvas(h, w)
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
        variant(rng),
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
            cv.paint(box, mask, Lid.BUILDING, Mat.FACADE, variant(rng))
            # windows: a grid in facade coordinates (a across, b down), so rows converge
            a = (bx - px0) / max(px1 - px0, 1e-3)
            b = (ys - roof) / np.maximum(base - roof, 1e-3)
            cols, rows = int(rng.integers(2, 7)), int(rng.integers(3, 9))
            fa, fb = np.modf(a * cols)[0], np.modf(b * rows)[0]
            win = mask & (fa > 0.25) & (fa < 0.75) & (fb > 0.25) & (fb < 0.7) & (b < 0.82)
            if win.any():
                cv.paint(box, win, Lid.BUILDING, Mat.WINDOW, variant(rng))
            if front_kind is not None:
                mat, metres = _FRONT_BANDS[front_kind]
                # (base - yh) / 2 is pixels per metre at the facade's foot (see the objects)
                height = metres * (base - yh) / 2 * (1 + 0.15 * np.sin(bx * rng.uniform(0.2, 0.6)))
                front_mask = mask & (ys >= base - height)
                cv.paint(box, front_mask, front_kind, mat, variant(rng))

    # Ground: road between the road lines, sidewalks, then terrain out to the facades.
    full = (slice(0, h), slice(0, w))
    left = {k: line_x(k, -1, depth) for k in ("road", "walk", "outer")}
    right = {k: line_x(k, 1, depth) for k in ("road", "walk", "outer")}
    ground_v = variant(rng)
    cv.paint(
        full,
        below & (xs >= left["outer"]) & (xs < right["outer"]),
        Lid.TERRAIN,
        Mat.TERRAIN,
        variant(rng),
    )
    cv.paint(
        full,
        below & (xs >= left["walk"]) & (xs < right["walk"]),
        Lid.SIDEWALK,
        Mat.SIDEWALK,
        variant(rng),
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
    objects: list[tuple[float, Drawer, float]] = []

    def at(kind: str, sd: int, f: float, t: float) -> float:
        """x on the ground at depth t, fraction f from the `kind` line towards the road line."""
        return line_x(kind, sd, t) + f * (line_x("road", sd, t) - line_x(kind, sd, t))

    def on_road(t: float, f: float) -> float:
        return line_x("road", -1, t) + f * (line_x("road", 1, t) - line_x("road", -1, t))

    for _ in range(int(rng.poisson(2.2))):
        t = rng.uniform(0.12, 0.85)
        f = rng.uniform(0.12, 0.88) if rng.random() < 0.7 else rng.choice([0.05, 0.95])
        objects.append((t, draw_car, on_road(t, f)))
    if rng.random() < 0.2:
        t = rng.uniform(0.15, 0.6)
        objects.append((t, draw_truck, on_road(t, rng.choice([0.1, 0.9]))))
    if rng.random() < 0.13:
        t = rng.uniform(0.15, 0.6)
        objects.append((t, draw_bus, on_road(t, rng.choice([0.12, 0.88]))))
    for _ in range(int(rng.poisson(1.8))):
        t = rng.uniform(0.12, 0.8)
        objects.append((t, draw_person, at("walk", side(rng), rng.uniform(0.15, 0.85), t)))
    if rng.random() < 0.22:
        t = rng.uniform(0.2, 0.8)
        objects.append((t, draw_ridden_bicycle, on_road(t, rng.choice([0.1, 0.9]))))
    if rng.random() < 0.15:
        t = rng.uniform(0.15, 0.7)
        objects.append((t, draw_bicycle, at("walk", side(rng), rng.uniform(0.1, 0.4), t)))
    if rng.random() < 0.12:
        t = rng.uniform(0.2, 0.8)
        objects.append((t, draw_motorcycle, on_road(t, rng.uniform(0.15, 0.85))))
    for _ in range(int(rng.integers(1, 5))):
        t = rng.uniform(0.1, 0.75)
        objects.append((t, draw_pole, at("walk", side(rng), rng.uniform(0.7, 0.92), t)))
    if rng.random() < 0.65:
        for _ in range(int(rng.integers(1, 4))):
            t = rng.uniform(0.1, 0.7)
            objects.append((t, draw_tree, at("outer", side(rng), rng.uniform(0.05, 0.4), t)))
    if rng.random() < 0.4:
        for _ in range(int(rng.integers(1, 3))):
            t = rng.uniform(0.15, 0.8)
            objects.append((t, draw_bin, at("walk", side(rng), rng.uniform(0.1, 0.5), t)))
    if rng.random() < 0.3:
        t = rng.uniform(0.05, 0.4)
        objects.append((t, draw_clutter, at("outer", side(rng), rng.uniform(0.0, 0.5), t)))

    for t, drawer, x in sorted(objects, key=lambda o: o[0]):
        yb, u = yh + t * g, t * g / 2.0  # ground row and pixels per metre at this depth
        drawer(cv, x, yb, u, rng)

    # Non-evaluated regions that real labels have: the ego car's bonnet and an out-of-ROI frame.
    if rng.random() < 0.25:
        eh = h * rng.uniform(0.06, 0.14)
        hood = ys > h - eh * (1 - 0.6 * ((xs - w / 2) / (w / 2)) ** 2)
        cv.paint(full, hood, Lid.EGO_VEHICLE, Mat.EGO, variant(rng))
    if rng.random() < 0.25:
        k = max(1, round(0.012 * h))
        frame = np.zeros((h, w), dtype=bool)
        frame[:k], frame[-k:], frame[:, :k], frame[:, -k:] = True, True, True, True
        cv.paint(full, frame, Lid.OUT_OF_ROI, Mat.BORDER)
    return Scene(cv.label, cv.material, cv.variant)
