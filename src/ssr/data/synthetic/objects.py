"""Street objects of the synthetic scenes, each drawn at a ground point in its own metric frame.

Every drawer has the `canvas.Drawer` signature `(canvas, cx, yb, u, rng)`: (cx, yb) is the
object's ground point in pixels and u the pixels per metre at its depth, so one drawing serves
any distance.
"""

from __future__ import annotations

import numpy as np

from ssr.data.synthetic.canvas import Canvas, Frame, Lid, Mat, side, variant


def draw_car(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Rear view: tyres, body, cabin, rear window, tail lights, plate (all labelled car)."""
    w, h, v = 1.8 * rng.uniform(0.9, 1.15), 1.45 * rng.uniform(0.9, 1.1), variant(rng)
    o = Frame(cv, cx, yb, u, Lid.CAR)
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


def draw_truck(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Side view: chassis, cargo box, cab with a window, wheels; the cab faces +x."""
    n, h = 5.5 * rng.uniform(0.85, 1.1), 3.0 * rng.uniform(0.9, 1.1)  # length, height
    o = Frame(cv, cx, yb, u, Lid.TRUCK, side(rng))
    o.rect(-n / 2, n / 2, 0.1 * h, 0.22 * h, Mat.TYRE)
    o.rect(-n / 2, 0.23 * n, 0.2 * h, h, Mat.TRUCK_BODY, variant(rng))
    o.rect(0.25 * n, n / 2, 0.2 * h, 0.72 * h, Mat.TRUCK_BODY, variant(rng))
    o.rect(0.29 * n, 0.46 * n, 0.46 * h, 0.68 * h, Mat.GLASS)
    for fx in (-0.38, -0.2, 0.35):
        o.ellipse(fx * n, 0.45, 0.45, 0.45, Mat.TYRE)


def draw_bus(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Side view: long body with a band of windows, wheels."""
    n, h = 7.0 * rng.uniform(0.85, 1.05), 3.0 * rng.uniform(0.95, 1.05)  # length, height
    o = Frame(cv, cx, yb, u, Lid.BUS)
    o.rect(-n / 2, n / 2, 0.1 * h, h, Mat.BUS_BODY, variant(rng))
    windows = int(rng.integers(5, 9))
    pitch = 0.94 * n / windows
    for i in range(windows):
        x = -0.47 * n + i * pitch
        o.rect(x, x + 0.82 * pitch, 0.55 * h, 0.9 * h, Mat.GLASS)
    for fx in (-0.33, 0.3):
        o.ellipse(fx * n, 0.5, 0.5, 0.5, Mat.TYRE)


def draw_person(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Standing pedestrian: legs, torso, arms, head."""
    hp = 1.75 * rng.uniform(0.88, 1.1)
    shirt, trousers, skin = variant(rng), variant(rng), variant(rng)
    o = Frame(cv, cx, yb, u, Lid.PERSON)
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


def _draw_seated_rider(o: Frame, hip: tuple[float, float], foot: tuple[float, float],
                       hand: tuple[float, float], rng: np.random.Generator) -> None:  # fmt: skip
    """A rider on a two-wheeler, drawn in the vehicle's frame `o` but labelled rider."""
    shirt, trousers, skin = variant(rng), variant(rng), variant(rng)
    o = Frame(o.cv, o.cx, o.yb, o.u, Lid.RIDER, o.d)
    shoulder = (hip[0] + 0.3, hip[1] + 0.62)
    knee = (hip[0] + 0.35, hip[1] - 0.25)
    o.line(hip, knee, 0.16, Mat.TROUSERS, trousers)
    o.line(knee, foot, 0.13, Mat.TROUSERS, trousers)
    o.line(hip, shoulder, 0.3, Mat.SHIRT, shirt)
    o.line(shoulder, hand, 0.1, Mat.SHIRT, shirt)
    o.ellipse(shoulder[0] + 0.06, shoulder[1] + 0.2, 0.12, 0.14, Mat.SKIN, skin)


def draw_bicycle(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator,
                  ridden: bool = False) -> None:  # fmt: skip
    """Side view bicycle: two tyres and a frame; `ridden` puts a rider on it."""
    o = Frame(cv, cx, yb, u, Lid.BICYCLE, side(rng))
    r = 0.34
    rear, front, bracket = (-0.55, r), (0.55, r), (0.0, r)
    seat, head, bar = (-0.18, 0.95), (0.42, 0.95), (0.47, 1.1)
    for hub in (rear, front):
        o.ellipse(*hub, r, r, Mat.TYRE, inner=0.78)
    frame = variant(rng)
    for a, b in ((rear, bracket), (bracket, seat), (seat, rear), (seat, head), (bracket, head),
                 (head, front), (head, bar)):  # fmt: skip
        o.line(a, b, 0.07, Mat.BIKE_FRAME, frame)
    if ridden:
        _draw_seated_rider(o, (seat[0], seat[1] + 0.05), (bracket[0], 0.2), bar, rng)


def draw_ridden_bicycle(cv: Canvas, cx: float, yb: float, u: float,
                         rng: np.random.Generator) -> None:  # fmt: skip
    draw_bicycle(cv, cx, yb, u, rng, ridden=True)


def draw_motorcycle(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Side view motorcycle (tyres, body, fork) with its rider."""
    o = Frame(cv, cx, yb, u, Lid.MOTORCYCLE, side(rng))
    r = 0.36
    for x in (-0.7, 0.7):
        o.ellipse(x, r, r, r, Mat.TYRE, inner=0.5)
    body = variant(rng)
    o.ellipse(0, 1.55 * r, 0.7, 0.28, Mat.MOTO_BODY, body)
    o.line((0.7, r), (0.5, 1.0), 0.09, Mat.BIKE_FRAME, body)
    _draw_seated_rider(o, (-0.2, 0.95), (0.1, 0.35), (0.5, 1.05), rng)


def draw_pole(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """A pole, optionally with a traffic light on top and/or a traffic sign."""
    ph = 4.2 * rng.uniform(0.9, 1.15)
    pw = max(1.0 / u, 0.14)  # at least one pixel
    Frame(cv, cx, yb, u, Lid.POLE).rect(-pw / 2, pw / 2, 0, ph, Mat.POLE, variant(rng))
    has_light = rng.random() < 0.4
    if has_light:
        o = Frame(cv, cx, yb, u, Lid.TRAFFIC_LIGHT)
        bw, bh = 0.38, 0.95
        top = ph + 0.2 * bh
        o.rect(-bw / 2, bw / 2, top - bh, top, Mat.LIGHT_BOX, variant(rng))
        lit = int(rng.integers(3))
        lamps = ((0.18, Mat.LAMP_RED), (0.5, Mat.LAMP_AMBER), (0.82, Mat.LAMP_GREEN))
        for i, (frac, mat) in enumerate(lamps):
            o.ellipse(0, top - frac * bh, 0.12, 0.12, mat if i == lit else Mat.LAMP_OFF)
    if rng.random() < (0.35 if has_light else 0.6):
        o = Frame(cv, cx, yb, u, Lid.TRAFFIC_SIGN)
        s = 0.65 * rng.uniform(0.85, 1.2)
        y = ph * (rng.uniform(0.55, 0.7) if has_light else rng.uniform(0.78, 0.95))
        v, shape = variant(rng), int(rng.integers(3))
        if shape == 0:
            o.rect(-s / 2, s / 2, y - s / 2, y + s / 2, Mat.SIGN, v)
        elif shape == 1:
            o.ellipse(0, y, s / 2, s / 2, Mat.SIGN, v)
        else:  # a yield triangle, point down
            o.poly([(-s / 2, y + s / 2), (s / 2, y + s / 2), (0, y - s / 2)], Mat.SIGN, v)


def draw_tree(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Trunk and a crown of overlapping ellipses (Cityscapes labels both vegetation)."""
    th = 2.2 * rng.uniform(0.8, 1.3)
    o = Frame(cv, cx, yb, u, Lid.VEGETATION)
    o.rect(-0.13, 0.13, 0, th, Mat.TRUNK, variant(rng))
    v = variant(rng)
    for _ in range(int(rng.integers(3, 6))):
        r = rng.uniform(0.8, 1.4)
        y, x = th + 0.8 + rng.normal(0, 0.5), rng.normal(0, 0.6)
        o.ellipse(x, y, r, r * rng.uniform(0.8, 1.1), Mat.FOLIAGE, v)


def draw_bin(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """Street furniture labelled "static" (not evaluated)."""
    w, h = 0.5 * rng.uniform(0.8, 1.4), 0.9 * rng.uniform(0.8, 1.3)
    Frame(cv, cx, yb, u, Lid.STATIC).rect(-w / 2, w / 2, 0, h, Mat.STATIC, variant(rng))


def draw_clutter(cv: Canvas, cx: float, yb: float, u: float, rng: np.random.Generator) -> None:
    """An unidentifiable blob labelled "unlabeled" (not evaluated)."""
    r = 0.4 * rng.uniform(0.7, 1.5)
    Frame(cv, cx, yb, u, Lid.UNLABELED).ellipse(0, r, r * rng.uniform(1.0, 2.0), r, Mat.CLUTTER)
