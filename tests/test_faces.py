"""`mdfer predict --detect-faces` and `--annotate` on a real face photo (scikit-image's astronaut,
a file inside its wheel), and predict's account of every input (conftest.tiny_tflite: an
untrained exported model, so these tests say where faces are, not what they feel)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import run_mdfer
from mdfer.faces import BOX_COLOUR, FaceDetector, crop_square, face_crop

PASTED_AT = ((30, 40), (640, 150))  # where the two copies of the astronaut go on the canvas
CANVAS = (1200, 700)
GREY = (90, 90, 90)


def astronaut() -> Image.Image:
    """The photo from inside scikit-image's wheel, read as a file: `skimage.data.astronaut()`
    would fetch it over the network if a build left it out."""
    import skimage.data

    path = Path(skimage.data.__file__).with_name("astronaut.png")
    assert path.is_file(), f"{path}: scikit-image's wheel no longer ships the astronaut photo"
    with Image.open(path) as image:
        return image.convert("RGB")


def two_faces(tmp_path: Path) -> Path:
    canvas = Image.new("RGB", CANVAS, GREY)
    for at in PASTED_AT:
        canvas.paste(astronaut(), at)
    path = tmp_path / "two.jpg"
    canvas.save(path, quality=95)
    return path


def expected_boxes() -> list[tuple[int, int, int, int]]:
    """The astronaut's own face box, moved to where each copy was pasted."""
    (x, y, w, h), = FaceDetector()(astronaut())
    return [(x + dx, y + dy, w, h) for dx, dy in PASTED_AT]


def near(found: list[int], expected: tuple[int, int, int, int]) -> bool:
    """The cascade's scale pyramid quantizes a box: a few pixels either way is the same face."""
    tolerance = max(3, expected[2] // 20)
    return all(abs(a - b) <= 2 * tolerance for a, b in zip(found, expected))


def test_two_pasted_faces_are_found_predicted_and_annotated(tiny_tflite, tmp_path):
    photo, out = two_faces(tmp_path), tmp_path / "annotated"
    done = run_mdfer("predict", str(photo), "--model", str(tiny_tflite), "--detect-faces", "--annotate", str(out),
                     "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    expected = expected_boxes()
    assert [row["face"] for row in rows] == [1, 2] and {row["image"] for row in rows} == {str(photo)}
    for row, box in zip(rows, expected):
        assert near(row["box"], box), (row["box"], box)
        assert list(row["heads"]) == ["fer2013", "fane", "domain"]
        assert sum(row["heads"]["fer2013"]["probabilities"].values()) == pytest.approx(1, abs=1e-3)
        assert row["annotated"] == str(out / "two.png")

    # each face is predicted as the same crop saved as a face file would be
    crop = tmp_path / "crop.png"
    with Image.open(photo) as image:
        face_crop(image.convert("RGB"), tuple(rows[1]["box"])).save(crop)
    single = run_mdfer("predict", str(crop), "--model", str(tiny_tflite), "--json")
    assert single.returncode == 0, single.stderr[-2000:]
    (alone,) = json.loads(single.stdout)
    assert alone["heads"] == rows[1]["heads"]

    # the table: one line per face with its box
    table = run_mdfer("predict", str(photo), "--model", str(tiny_tflite), "--detect-faces")
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and len(lines) == 2, table.stdout + table.stderr[-2000:]
    for number, (line, row) in enumerate(zip(lines, rows), 1):
        x, y, w, h = row["box"]
        assert line.startswith(f"{photo} face {number} at {x},{y} {w}x{h}: fer2013 "), line

    # the annotated PNG: the photo's size, each face's box drawn on its edges, nothing inside
    with Image.open(out / "two.png") as image:
        assert image.format == "PNG" and image.size == CANVAS
        drawn = np.all(np.asarray(image.convert("RGB")) == BOX_COLOUR, axis=-1)
    with Image.open(photo) as image:
        assert not np.all(np.asarray(image.convert("RGB")) == BOX_COLOUR, axis=-1).any()  # none before
    for x, y, w, h in (row["box"] for row in rows):
        right, bottom = x + w - 1, y + h - 1
        assert drawn[y:bottom + 1, x].all() and drawn[y:bottom + 1, right].all()  # left and right edges
        assert drawn[y, x:right + 1].all() and drawn[bottom, x:right + 1].all()  # top and bottom edges
        assert drawn[y - 3, x + 1]  # the label's tab, above the box
        assert not drawn[y + 6:bottom - 5, x + 6:right - 5].any()  # the face itself untouched
    assert drawn.sum() < 0.05 * drawn.size and not drawn[:30, :30].any()


def test_a_photo_without_a_face_is_said_so(tiny_tflite, tmp_path):
    """A blank canvas beside the two-face photo: its own entry and stderr line, the faces still
    predicted, exit code 2 (an input gave no prediction)."""
    two_faces(tmp_path)
    Image.new("RGB", (400, 300), GREY).save(tmp_path / "blank.png")
    done = run_mdfer("predict", str(tmp_path), "--model", str(tiny_tflite), "--detect-faces", "--json")
    assert done.returncode == 2, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert [(Path(row["image"]).name, row.get("face")) for row in rows] == [("blank.png", None), ("two.jpg", 1),
                                                                           ("two.jpg", 2)]
    assert rows[0]["error"] == f"{tmp_path / 'blank.png'}: no face found (none of 48 px or more)"
    errors = done.stderr.strip().splitlines()
    assert errors == [f"mdfer predict: error: {rows[0]['error']}"], done.stderr
    smaller = run_mdfer("predict", str(tmp_path / "two.jpg"), "--model", str(tiny_tflite), "--detect-faces",
                        "--min-face", "200")
    assert smaller.returncode == 2 and "two.jpg: no face found (none of 200 px or more)" in smaller.stderr


def test_every_input_in_a_folder_is_accounted_for(tiny_tflite, tmp_path):
    """Links are read as `prepare` reads them: a file link is followed; a dangling link, a link
    to itself and a link to a folder (here a loop back up) each get an entry and a stderr line."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 30), (200, 10, 10)).save(folder / "a.png")
    os.symlink(folder / "a.png", folder / "b.png")
    os.symlink(folder / "gone.png", folder / "dangling.png")
    os.symlink(folder / "self.png", folder / "self.png")
    os.symlink(folder, folder / "sub" / "up")
    done = run_mdfer("predict", str(folder), "--model", str(tiny_tflite), "--json")
    assert done.returncode == 2, done.stderr[-2000:]
    rows = {Path(row["image"]).relative_to(folder).as_posix(): row for row in json.loads(done.stdout)}
    assert list(rows) == ["a.png", "b.png", "dangling.png", "self.png", "sub/up"]
    assert rows["a.png"]["heads"] == rows["b.png"]["heads"]
    problems = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert problems == {"dangling.png": f"{folder / 'dangling.png'}: broken link (its target is missing)",
                        "self.png": f"{folder / 'self.png'}: link loop",
                        "sub/up": f"{folder / 'sub' / 'up'}: link to a folder (not followed)"}
    assert done.stderr.strip().splitlines() == [f"mdfer predict: error: {problems[name]}" for name in problems]


def test_a_crop_is_square_with_its_margin_and_black_past_the_border():
    photo = Image.new("RGB", (100, 80), (255, 255, 255))
    assert crop_square((10, 20, 40, 40), 0.25) == (0, 10, 60, 70)  # 40 px + 10 on each side
    corner = face_crop(photo, (0, 0, 40, 40), 0.25)
    assert corner.size == (60, 60)
    pixels = np.asarray(corner)
    assert (pixels[:10] == 0).all() and (pixels[:, :10] == 0).all()  # beyond the photo: black
    assert (pixels[10:, 10:] == 255).all()


def test_annotate_head_and_opencv_are_checked_in_one_line(tiny_tflite, tmp_path, monkeypatch, capsys):
    """In-process, with OpenCV made unimportable: crops still predict (and annotate, the whole
    image boxed); --detect-faces says which extra to install; an unknown head is named."""
    from mdfer.cli import main
    image = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (120, 100, 90)).save(image)
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now fails as if not installed
    assert main(["predict", str(image), "--model", str(tiny_tflite), "--annotate", str(tmp_path / "out"),
                 "--annotate-head", "fane"]) == 0, capsys.readouterr().err
    with Image.open(tmp_path / "out" / "face.png") as annotated:
        drawn = np.all(np.asarray(annotated.convert("RGB")) == BOX_COLOUR, axis=-1)
    assert annotated.size == (64, 64) and drawn[:, 0].all() and drawn[-1, :].all() and not drawn[30:60, 10:60].any()
    capsys.readouterr()
    for args, expected in (
            (["--detect-faces"], 'mdfer predict: error: --detect-faces needs OpenCV: pip install "mdfer[faces]"'),
            (["--annotate", str(tmp_path / "x"), "--annotate-head", "nope"],
             f"mdfer predict: error: --annotate-head 'nope': {tiny_tflite} has the heads fer2013, fane, domain"),
            (["--face-margin", "0.2"], "mdfer predict: error: --min-face and --face-margin go with --detect-faces")):
        assert main(["predict", str(image), "--model", str(tiny_tflite), *args]) == 2
        assert capsys.readouterr().err.strip() == expected
