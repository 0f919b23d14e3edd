"""Faces in whole photos: find them, crop each as the training faces were cropped, and draw the
result. The detector is OpenCV's frontal-face Haar cascade, a file inside the
opencv-python-headless wheel (the `faces` extra), so nothing is downloaded at run time; OpenCV
is imported only when a detector is made. No TensorFlow here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mdfer.errors import MdferError

# FER2013's faces are tight crops (forehead to chin, cheek to cheek); the cascade's box stops
# near the eyebrows and the lower lip, so each side grows by this share of the box's side.
FACE_MARGIN = 0.15
MIN_FACE = 48  # px: the smallest face side searched for (FER2013's own size; smaller ones are mostly false hits)
CASCADE = "haarcascade_frontalface_default.xml"
SCALE_STEP = 1.1  # the cascade's scale pyramid: 10% per level
MIN_NEIGHBORS = 5  # overlapping hits a face needs; fewer finds more faces and more false ones
BOX_COLOUR = (0, 255, 0)
LABEL_TEXT = (0, 0, 0)
FACES_EXTRA = 'pip install "mdfer[faces]"'

Box = tuple[int, int, int, int]  # x, y, width, height in the photo's pixels


class FaceDetector:
    """Frontal faces of at least `min_face` px, left to right."""

    def __init__(self, min_face: int = MIN_FACE):
        try:
            import cv2
        except ImportError as exc:  # not installed, or a broken install (a missing system library)
            cause = "" if isinstance(exc, ModuleNotFoundError) else f" (import cv2: {exc})"
            raise MdferError(f"--detect-faces needs OpenCV: {FACES_EXTRA}{cause}") from None
        if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved the Haar cascades out
            raise MdferError(f"--detect-faces needs OpenCV 4 (OpenCV {cv2.__version__} has no Haar "
                             f"cascades): {FACES_EXTRA}")
        path = os.path.join(cv2.data.haarcascades, CASCADE)
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise MdferError(f"{path}: OpenCV could not load its face cascade; reinstall: {FACES_EXTRA}")
        self.min_face = min_face

    def __call__(self, photo: Image.Image) -> list[Box]:
        gray = np.asarray(photo.convert("L"))
        found = self.cascade.detectMultiScale(gray, scaleFactor=SCALE_STEP, minNeighbors=MIN_NEIGHBORS,
                                              minSize=(self.min_face, self.min_face))
        return sorted(tuple(int(v) for v in box) for box in found)


def crop_square(box: Box, margin: float = FACE_MARGIN) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square on the box's centre, `margin` of its side added
    on every side; it may reach past the photo's border."""
    x, y, width, height = box
    side = round(max(width, height) * (1 + 2 * margin))
    left, top = round(x + width / 2 - side / 2), round(y + height / 2 - side / 2)
    return left, top, left + side, top + side


def face_crop(photo: Image.Image, box: Box, margin: float = FACE_MARGIN) -> Image.Image:
    """The face as a cropped face file would hold it: `crop_square`, black beyond the photo's
    border (as training's shifted and rotated faces are filled)."""
    return photo.crop(crop_square(box, margin))


def annotate(photo: Image.Image, labelled: list[tuple[Box, str]]) -> Image.Image:
    """A copy of the photo with each box drawn and its label on a filled tab above it (inside
    the box when there is no room above)."""
    out = photo.convert("RGB")
    draw = ImageDraw.Draw(out)
    line = max(2, round(min(out.size) / 250))
    try:
        font = ImageFont.load_default(size=max(12, round(min(out.size) / 40)))
    except ImportError:  # a Pillow built without FreeType: its small bitmap font
        font = ImageFont.load_default()
    for (x, y, width, height), text in labelled:
        draw.rectangle((x, y, x + width - 1, y + height - 1), outline=BOX_COLOUR, width=line)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tab_w, tab_h = right - left + 2 * line, bottom - top + 2 * line
        tab_y = y - tab_h if y >= tab_h else y + line
        draw.rectangle((x, tab_y, x + tab_w, tab_y + tab_h), fill=BOX_COLOUR)
        draw.text((x + line - left, tab_y + line - top), text, fill=LABEL_TEXT, font=font)
    return out


def annotated_path(folder: Path, image: str, taken: set[Path]) -> Path:
    """`folder`/<image's name>.png, numbered (-2, -3, ...) when two inputs share a name."""
    stem, number = Path(image).stem, 1
    path = folder / f"{stem}.png"
    while path in taken:
        number += 1
        path = folder / f"{stem}-{number}.png"
    taken.add(path)
    return path
