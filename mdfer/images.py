"""Image decoding and augmentation: plain Pillow and numpy, no Ray, no TensorFlow.

One place turns file bytes into the 8-bit RGB pixels every model sees, so `prepare` (its checks),
the Ray Data stream (training), `evaluate` and `predict` (on a Raspberry Pi, without Ray) decode
alike. The batch functions here are what the stream maps over its blocks.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
from PIL import Image, ImageOps

from mdfer.config import AugmentConfig

EVAL_BATCH = 128  # fixed: a model traced for one batch shape retraces (seconds) for another
ERASE_AREA = (0.02, 0.25)  # random erasing: the rectangle's share of the image
ERASE_ASPECT = (0.3, 3.3)  # and its height/width ratio (log-uniform), as in Zhong et al. 2020
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any mode Pillow opens -> 8-bit RGB with the brightness the file means. Pillow's own
    convert() clips 16-bit and float pixels to 255 (a 16-bit face came out 99.8% white), so those
    are scaled: 16-bit by 1/257, 32-bit integers holding 16-bit data likewise, floats in 0..1 by 255.
    Palette, CMYK, LA, RGBA, 1-bit: Pillow's conversion (alpha is dropped, colours kept).
    Raises ValueError for pixels that have no 8-bit meaning (negative, float above 255)."""
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
            raise ValueError(f"{image.mode} pixels below 0 or not finite (min {low:g}, max {high:g})")
        if image.mode in _SIXTEEN_BIT or (image.mode == "I" and high > 255):
            if high > 65535:
                raise ValueError(f"{image.mode} pixels above 65535 (max {high:g})")
            pixels = pixels / 257.0
        elif image.mode == "F" and high <= 1.0:
            pixels = pixels * 255.0
        elif high > 255:
            raise ValueError(f"float pixels above 255 (max {high:g}): no 8-bit meaning")
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def model_input(image: Image.Image, size: int) -> Image.Image:
    """RGB at size x size (grayscale repeated over three channels): a face file as training reads
    it, and a face cropped from a photo (`mdfer.faces`) likewise."""
    return to_rgb8(image).resize((size, size), Image.Resampling.BILINEAR)


def decode_image(data: bytes, size: int) -> Image.Image:
    """Any readable image -> RGB at size x size (`model_input`)."""
    with Image.open(io.BytesIO(data)) as image:
        return model_input(image, size)


def decode_photo(data: bytes, upright: bool = True) -> Image.Image:
    """A whole image, 8-bit RGB at its own size; `upright`: turned by its EXIF orientation, as a
    viewer shows it (the face detector finds upright faces only, and an annotated copy must look
    like the photo). Training's faces are read as stored (`decode_image`)."""
    with Image.open(io.BytesIO(data)) as image:
        return to_rgb8(ImageOps.exif_transpose(image) if upright else image)


def erase_rectangle(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random erasing: one rectangle of the image (in place) becomes uniform noise, so the model
    cannot lean on any single face part (a hand over the mouth, a cut-off chin)."""
    height, width = pixels.shape[:2]
    area = rng.uniform(*ERASE_AREA) * height * width
    aspect = math.exp(rng.uniform(math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])))
    h = min(height, max(1, round(math.sqrt(area * aspect))))
    w = min(width, max(1, round(math.sqrt(area / aspect))))
    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    pixels[top:top + h, left:left + w] = rng.integers(0, 256, (h, w, 1) if pixels.ndim == 3 else (h, w),
                                                      dtype=np.uint8)
    return pixels


def augment_image(pixels: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Flip, small shift and rotation (one affine warp), then brightness and contrast, then
    (with probability `erase`) random erasing. The noise is grey (one value for all channels),
    as FER2013's images are."""
    image = Image.fromarray(pixels)
    size = image.size[0]
    if aug.flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-aug.max_rotation_deg, aug.max_rotation_deg)
    dx, dy = rng.uniform(-aug.max_shift, aug.max_shift, size=2) * size
    if angle or dx or dy:
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy),
                             fillcolor=(0, 0, 0))
    out = np.asarray(image, dtype=np.float32)
    contrast = 1.0 + rng.uniform(-aug.contrast, aug.contrast)
    brightness = rng.uniform(-aug.brightness, aug.brightness) * 255.0
    mean = out.mean()
    out = np.clip((out - mean) * contrast + mean + brightness, 0, 255).astype(np.uint8)
    if aug.erase and rng.random() < aug.erase:
        erase_rectangle(out, rng)
    return out


class DecodeBatch:
    """Batch function: Parquet rows -> uint8 RGB images plus labels (uint8 keeps the object store
    and transfers small; the model casts)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [np.asarray(decode_image(data, self.size), dtype=np.uint8) for data in batch["image"]]
        return {
            "image": np.stack(images) if images else np.zeros((0, self.size, self.size, 3), np.uint8),
            "domain": batch["domain_index"].astype(np.int32),
            "label": batch["label"].astype(np.int32),
        }


class AugmentBatch:
    """Batch function: fresh random augmentation of decoded images, every epoch. With a `seed`,
    each batch draws from (seed, the epoch, the batch's own pixels and labels): the same batch
    in the same epoch of a run with the same seed gets the same augmentation, whichever task or
    process runs it. The epoch is Ray Data's execution index of the dataset (0 outside Ray)."""

    def __init__(self, augment: AugmentConfig, seed: list[int] | None = None):
        self.augment = augment
        self.seed = seed

    def _rng(self, batch: dict[str, np.ndarray]) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        content = zlib.crc32(np.ascontiguousarray(batch["image"]).data)
        content = zlib.crc32(np.ascontiguousarray(batch["label"]).data, content)
        return np.random.default_rng([*self.seed, _execution_index(), content])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = self._rng(batch)
        return {**batch, "image": np.stack([augment_image(p, self.augment, rng) for p in batch["image"]])
                if len(batch["image"]) else batch["image"]}


def _execution_index() -> int:
    """How many times the dataset being executed has run before (its epoch, under Ray Train);
    Ray Data's own seeded operators use the same counter. 0 without Ray."""
    try:
        from ray.data.context import DataContext
    except ImportError:
        return 0
    return int(getattr(DataContext.get_current(), "_execution_idx", 0))
