"""Domain appearance: the game-like source style, the real-like target style, and the renderer.

Both domains render the same kind of layout; only palette, texture, blur, lighting and sensor
noise differ, which is the gap that UDA has to close.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np
from PIL import Image

from ssr.data.synthetic.canvas import Mat, Scene
from ssr.data.synthetic.layout import sample_scene

SOURCE_SIZE: tuple[int, int] = (176, 320)  # (H, W): GTA5's 1914x1052 aspect, small
TARGET_SIZE: tuple[int, int] = (128, 256)  # (H, W): Cityscapes' 2:1 aspect, small

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
    """Gaussian blur of an (H, W, C) float32 image, radius ceil(2.5 σ), replicated borders."""
    if sigma <= 0:
        return img
    size = 2 * max(1, int(np.ceil(2.5 * sigma))) + 1
    return cv2.GaussianBlur(img, (size, size), sigma, borderType=cv2.BORDER_REPLICATE)


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
