"""Procedurally drawn face datasets in the FER2013 and FANE folder layouts.

Tests and the demo need data a model can really learn from, without downloading anything.
Each image is a cartoon face whose expression (mouth, brows, eyes, asymmetry, blush) follows
its class, under per-image nuisance variation (pose, scale, skin, background, noise) so that
the task is learnable by a small CNN but not trivial. Output is byte-deterministic: every image
draws from its own generator seeded by (dataset, seed, split, folder, index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FER_FOLDERS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
FANE_FOLDERS = (
    "angry", "confused", "disgust", "fear", "happy", "neutral", "sad", "shy", "surprise",
)

FER_SIZE = (48, 48)
FANE_SIZE_RANGE = (64, 160)
JPEG_QUALITY = 90
# Dataset tags keep the FER and FANE seed streams apart, so the two sets never share an image.
_FER_TAG = 1
_FANE_TAG = 2


@dataclass(frozen=True)
class Expression:
    """Geometric face parameters for one class; all are unitless, 0 means neutral."""

    mouth_curve: float = 0.0  # >0 smile (corners up), <0 frown
    mouth_open: float = 0.0  # 0 closed line, 1 wide open
    mouth_width: float = 1.0  # relative to neutral width
    mouth_skew: float = 0.0  # >0 raises the right corner only (one-sided mouth)
    brow_tilt: float = 0.0  # >0 inner ends down (angry), <0 inner ends up (sad)
    brow_raise: float = 0.0  # >0 both brows up
    brow_asym: float = 0.0  # >0 raises the right brow only
    eye_open: float = 1.0  # eye height relative to neutral
    gaze_x: float = 0.0  # pupil offset, fraction of the eye half-width
    gaze_y: float = 0.0
    head_tilt: float = 0.0  # degrees, added to the random roll
    blush: float = 0.0  # 0..1 cheek redness
    wrinkle: float = 0.0  # 0..1 nose wrinkle lines (disgust)


# One parameter set per folder name; FER and FANE share the names they have in common.
EXPRESSIONS: dict[str, Expression] = {
    "neutral": Expression(),
    "happy": Expression(
        mouth_curve=1.0, mouth_open=0.25, mouth_width=1.25, eye_open=0.45, brow_raise=0.15
    ),
    "sad": Expression(
        mouth_curve=-0.8, mouth_width=0.9, brow_tilt=-1.0, eye_open=0.75, gaze_y=0.4
    ),
    "angry": Expression(
        mouth_curve=-0.35, mouth_width=0.8, brow_tilt=1.0, brow_raise=-0.5, eye_open=0.7
    ),
    "surprise": Expression(mouth_open=1.0, mouth_width=0.55, brow_raise=1.0, eye_open=1.5),
    "fear": Expression(
        mouth_curve=-0.3, mouth_open=0.5, mouth_width=1.15,
        brow_tilt=-0.7, brow_raise=0.6, eye_open=1.4,
    ),
    "disgust": Expression(
        mouth_curve=-0.5, mouth_skew=0.7, mouth_open=0.15,
        brow_tilt=0.6, eye_open=0.55, wrinkle=1.0,
    ),
    "confused": Expression(
        mouth_skew=-0.7, mouth_width=0.8, brow_asym=1.0, head_tilt=9.0, gaze_x=0.5, gaze_y=-0.4
    ),
    "shy": Expression(
        mouth_curve=0.35, mouth_width=0.7, eye_open=0.7,
        gaze_x=-0.6, gaze_y=0.6, head_tilt=-10.0, blush=1.0,
    ),
}

# Gaussian jitter (standard deviation) applied to each parameter of every drawn face.
_JITTER = {"head_tilt": 3.0, "eye_open": 0.12, "mouth_width": 0.1, "blush": 0.15, "wrinkle": 0.15}
_DEFAULT_JITTER = 0.15


def _jittered(expr: Expression, rng: np.random.Generator) -> Expression:
    """Perturb every parameter so that no two faces of a class are identical."""
    changes = {}
    for f in fields(expr):
        value = getattr(expr, f.name) + rng.normal(0.0, _JITTER.get(f.name, _DEFAULT_JITTER))
        if f.name in ("eye_open", "mouth_width"):
            value = max(value, 0.2)
        elif f.name in ("mouth_open", "blush", "wrinkle"):
            value = max(value, 0.0)
        changes[f.name] = value
    return replace(expr, **changes)


def _skin_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A skin tone between dark and light, so brightness carries no class information."""
    dark, light = np.array([95, 60, 40]), np.array([250, 215, 190])
    color = dark + rng.uniform(0.0, 1.0) * (light - dark) + rng.normal(0, 8, 3)
    return tuple(int(c) for c in np.clip(color, 0, 255))


def _shade(
    color: Sequence[int], factor: float, tint: Sequence[float] = (1, 1, 1)
) -> tuple[int, int, int]:
    """Darken/tint a colour: outlines, hair and blush follow the skin, not the class."""
    return tuple(int(np.clip(c * factor * t, 0, 255)) for c, t in zip(color, tint))


def _mouth_polygon(
    cx: float, cy: float, half_w: float, unit: float, e: Expression, lower: bool
) -> list[tuple[float, float]]:
    """Points of the upper (or lower) lip line: a parabola bent by curve, tilted by skew."""
    points = []
    for x in np.linspace(-1.0, 1.0, 13):
        y = cy + 0.35 * unit * e.mouth_curve * (1 - x * x) - 0.6 * unit * e.mouth_skew * max(x, 0.0)
        bulge = e.mouth_open * unit * math.sqrt(max(1 - x * x, 0.0))
        y += 0.6 * bulge if lower else -0.2 * bulge
        points.append((cx + x * half_w, y))
    return points


def draw_face(
    expression: str, rng: np.random.Generator, size: tuple[int, int], rgb: bool
) -> Image.Image:
    """Draw one face of the given class at `size` (width, height), RGB or grayscale ("L").

    Drawn supersampled and reduced for antialiasing; pose, scale, skin, background, noise and
    the expression parameters themselves vary per image, all taken from `rng`.
    """
    e = _jittered(EXPRESSIONS[expression], rng)
    width, height = size
    ss = max(2, math.ceil(160 / max(width, height)))  # supersampling factor
    w, h = width * ss, height * ss

    level = rng.integers(20, 236, 3 if rgb else 1)  # grayscale: one level in all three bands
    background = tuple(int(c) for c in np.resize(level, 3))
    skin = _skin_color(rng)
    img = Image.new("RGB", (w, h), background)
    draw = ImageDraw.Draw(img)

    base = min(w, h)
    scale = rng.uniform(0.9, 1.08)
    rx, ry = 0.34 * base * scale, 0.43 * base * scale
    cx = w / 2 + rng.uniform(-0.05, 0.05) * base
    cy = h / 2 + rng.uniform(-0.05, 0.05) * base
    unit = ry / 4  # feature-size unit

    if rng.random() < 0.6:  # hair as nuisance: colour unrelated to class
        hair = _shade(skin, rng.uniform(0.15, 0.9))
        draw.ellipse((cx - rx * 1.06, cy - ry * 1.08, cx + rx * 1.06, cy + ry * 0.35), fill=hair)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)

    line = _shade(skin, 0.3)
    thick = max(1, round(unit * 0.22))
    eye_y = cy - 0.15 * ry
    eye_dx = 0.4 * rx
    eye_w = 0.2 * rx
    eye_h = 0.09 * ry * e.eye_open
    for side in (-1, 1):
        ex = cx + side * eye_dx
        eye = (ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h)
        draw.ellipse(eye, fill=(245, 245, 245), outline=line)
        pr = min(eye_w * 0.45, eye_h)
        px, py = ex + e.gaze_x * eye_w * 0.5, eye_y + e.gaze_y * eye_h * 0.5
        draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=(25, 20, 20))

        # Brow: inner end near the nose, outer end over the eye's outside corner.
        brow_y = eye_y - 0.2 * ry - e.brow_raise * 0.1 * ry
        if side > 0:
            brow_y -= e.brow_asym * 0.12 * ry
        inner = (cx + side * 0.15 * rx, brow_y + e.brow_tilt * 0.09 * ry)
        outer = (cx + side * 0.62 * rx, brow_y - e.brow_tilt * 0.03 * ry)
        draw.line((inner, outer), fill=line, width=round(thick * 1.6))

    if e.blush > 0.4:
        blush = _shade(skin, 1.0 - 0.25 * min(e.blush, 1.5), (1.15, 0.8, 0.8))
        for side in (-1, 1):
            bx, by = cx + side * 0.5 * rx, cy + 0.2 * ry
            draw.ellipse(
                (bx - 0.16 * rx, by - 0.07 * ry, bx + 0.16 * rx, by + 0.07 * ry), fill=blush
            )

    if rng.random() < 0.7:  # nose is optional, so its absence carries no class signal
        nose_w = 0.08 * rx
        nose = ((cx, cy), (cx - nose_w, cy + 0.18 * ry), (cx + nose_w, cy + 0.18 * ry))
        draw.line(nose, fill=line, width=thick)
    if e.wrinkle > 0.3:
        for side in (-1, 1):
            x0 = cx + side * 0.13 * rx
            wrinkle = ((x0, cy - 0.02 * ry), (x0 + side * 0.06 * rx, cy + 0.08 * ry))
            draw.line(wrinkle, fill=line, width=thick)

    mouth_y = cy + 0.45 * ry
    half_w = 0.3 * rx * e.mouth_width
    upper = _mouth_polygon(cx, mouth_y, half_w, unit, e, lower=False)
    if e.mouth_open > 0.1:
        lower = _mouth_polygon(cx, mouth_y, half_w, unit, e, lower=True)
        draw.polygon(upper + lower[::-1], fill=(60, 15, 20), outline=line)
    else:
        draw.line(upper, fill=line, width=thick, joint="curve")

    angle = rng.normal(0.0, 4.0) + e.head_tilt
    if not rgb:  # convert before the costly rotation: one band instead of three
        img = img.convert("L")
    fill = background if rgb else background[0]
    img = img.rotate(angle, Image.Resampling.BILINEAR, center=(cx, cy), fillcolor=fill)
    img = img.reduce(ss)

    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels * rng.uniform(0.8, 1.2) + rng.uniform(-25, 25)  # contrast / exposure
    pixels += rng.normal(0.0, rng.uniform(2.0, 10.0), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _image_rng(tag: int, seed: int, split: str, folder: str, index: int) -> np.random.Generator:
    """A generator unique to one image; stable across runs and Python versions (no hash())."""
    words = [tag, seed, index, *split.encode(), 0, *folder.encode()]
    return np.random.default_rng(np.random.SeedSequence(words))


def _write_split(
    root: Path,
    split: str,
    folders: Sequence[str],
    per_class: int,
    *,
    tag: int,
    seed: int,
    rgb: bool,
    size: Callable[[np.random.Generator], tuple[int, int]],
    name: Callable[[str, int], str],
) -> dict[str, int]:
    """Draw and save `per_class` JPEGs into `root/split/<folder>/`; shared by both layouts."""
    counts = {}
    for folder in folders:
        out = root / split / folder
        out.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = _image_rng(tag, seed, split, folder, i)
            image = draw_face(folder, rng, size(rng), rgb)
            image.save(out / name(folder, i), format="JPEG", quality=JPEG_QUALITY)
        counts[folder] = per_class
    return counts


def _fer_name(prefix: str, per_class: int, folder: str, i: int) -> str:
    return f"{prefix}_{FER_FOLDERS.index(folder) * per_class + i:05d}.jpg"


def write_fer_like(
    root: str | Path, train_per_class: int, test_per_class: int, seed: int = 0
) -> dict:
    """Write a FER2013-style tree: root/{train,test}/<folder>/*.jpg, 48x48 grayscale.

    Returns {"train": {folder: count}, "test": {folder: count}}. File numbers are unique within
    a split, as in the Kaggle export (Training_00012.jpg, PublicTest_00012.jpg).
    """
    result = {}
    splits = (("train", "Training", train_per_class), ("test", "PublicTest", test_per_class))
    for split, prefix, per_class in splits:
        result[split] = _write_split(
            Path(root),
            split,
            FER_FOLDERS,
            per_class,
            tag=_FER_TAG,
            seed=seed,
            rgb=False,
            size=lambda rng: FER_SIZE,
            name=partial(_fer_name, prefix, per_class),
        )
    return result


def _fane_size(rng: np.random.Generator) -> tuple[int, int]:
    """A square-ish (not necessarily square) size, as FANE's crops vary in both sides."""
    lo, hi = FANE_SIZE_RANGE
    side = int(rng.integers(lo, hi + 1))
    other = int(np.clip(round(side * rng.uniform(0.85, 1.15)), lo, hi))
    return (side, other) if rng.random() < 0.5 else (other, side)


def write_fane_like(root: str | Path, per_class: int, seed: int = 0) -> dict:
    """Write a FANE-style tree: root/fane_data/<folder>/*.jpg, RGB of varying size (64-160 px).

    Returns {folder: count}.
    """
    return _write_split(
        Path(root),
        "fane_data",
        FANE_FOLDERS,
        per_class,
        tag=_FANE_TAG,
        seed=seed,
        rgb=True,
        size=_fane_size,
        name=lambda folder, i: f"{folder}_{i:05d}.jpg",
    )


def write_demo(root: str | Path, per_class: int, seed: int = 0) -> dict:
    """Both layouts under `root` (fer2013/, fane/): the demo's and `mdfer synth`'s data.
    FER-like gets a quarter as many test images; FANE-like has no split, so a quarter more."""
    return {
        "fer2013": write_fer_like(Path(root) / "fer2013", per_class, max(2, per_class // 4), seed=seed),
        "fane": write_fane_like(Path(root) / "fane", per_class + per_class // 4, seed=seed),
    }
