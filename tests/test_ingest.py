"""`prepare` on a hostile folder: every file accounted for, to a local and an S3 store."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mdfer import synth
from mdfer.config import load_config
from mdfer.dataset import DatasetManifest
from mdfer.errors import DataError, MdferError
from mdfer.ingest import prepare
from mdfer.layout import dataset_key
from mdfer.storage import Store


def _png(size, mode="RGBA") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 128) if mode == "RGBA" else 7).save(out, "PNG")
    return out.getvalue()


def hostile_fer(root: Path) -> dict[str, str]:
    """A small FER-like tree plus one of each kind of bad file; returns path -> expected fate."""
    synth.write_fer_like(root, train_per_class=6, test_per_class=3, seed=3)
    train, test = root / "train", root / "test"
    good = (train / "happy").glob("*.jpg").__next__().read_bytes()
    fates = {
        "train/happy/zero.jpg": "empty file",
        "train/sad/notes.txt": "not an image",
        "train/angry/garbage.jpg": "not an image",
        "train/fear/truncated.jpg": "truncated or corrupt",
        "train/contempt/x.jpg": "unknown class folder",
        "train/surprise/tiny.png": "too small",
        "train/loose.jpg": "not inside a class folder",
        "train/neutral/blank.png": "blank image",
        "train/happy/rgba.png": "accepted",
    }
    (train / "contempt").mkdir()
    (train / "happy/zero.jpg").write_bytes(b"")
    (train / "sad/notes.txt").write_text("not a face\n")
    (train / "angry/garbage.jpg").write_bytes(b"this is no jpeg at all " * 20)
    (train / "fear/truncated.jpg").write_bytes(good[: len(good) // 2])
    (train / "contempt/x.jpg").write_bytes(good)
    (train / "surprise/tiny.png").write_bytes(_png((1, 1), "L"))
    (train / "loose.jpg").write_bytes(good)
    (train / "neutral/blank.png").write_bytes(_png((48, 48), "L"))
    rgba = Image.new("RGBA", (48, 48))
    rgba.putdata([(x % 255, (x * 7) % 255, 90, 200) for x in range(48 * 48)])
    rgba.save(train / "happy/rgba.png")
    # byte-identical copies of test images in train: same label, and a conflicting label
    same = sorted((test / "angry").glob("*.jpg"))[0]
    conflict = sorted((test / "sad").glob("*.jpg"))[0]
    shutil.copy(same, train / "angry/dup_same.jpg")
    shutil.copy(conflict, train / "happy/dup_conflict.jpg")
    fates["train/angry/dup_same.jpg"] = "duplicate"
    fates["train/happy/dup_conflict.jpg"] = "duplicate"
    return fates


def fer_only(root: str, **overrides):
    config = load_config(None, {"fer2013": root})
    config.data.domains = [config.domain("fer2013")]
    for stage in config.train.stages:
        stage.loss_weights.pop("fane")
    for key, value in overrides.items():
        setattr(config.data, key, value)
    return config


def read_rows(store: Store, manifest: DatasetManifest) -> list[dict]:
    rows = []
    for split in manifest.shards:
        for key in manifest.shard_keys(split):
            rows += pq.read_table(io.BytesIO(store.read_bytes(key))).to_pylist()
    return rows


def check_accounting(root: Path, fates: dict[str, str], manifest: DatasetManifest, store: Store) -> None:
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    totals = manifest.totals
    assert totals.scanned == len(on_disk)
    assert totals.scanned == totals.accepted + totals.rejected + totals.duplicates
    rejected = {r.path: r.reason for r in manifest.rejected}
    dropped = {p for d in manifest.duplicates for p in d.dropped}
    rows = read_rows(store, manifest)
    accepted = {r["source_path"] for r in rows}
    assert len(rows) == totals.accepted == len(accepted)
    # every file is in exactly one place
    assert set(on_disk) == accepted | set(rejected) | dropped
    assert not (accepted & set(rejected)) and not (accepted & dropped) and not (dropped & set(rejected))
    for path, fate in fates.items():
        if fate == "accepted":
            assert path in accepted
        elif fate == "duplicate":
            assert path in dropped
        else:
            assert rejected[path].startswith(fate), (path, rejected[path])
    conflicts = [d for d in manifest.duplicates if d.conflicting_labels]
    assert [d.dropped for d in conflicts] == [["train/happy/dup_conflict.jpg"]]
    assert conflicts[0].labels == ["happy", "sad"] and conflicts[0].kept.startswith("test/sad/")
    # no image of val or test also in train
    hashes = {s: {r["content_hash"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["val"]
    # counts agree with the rows, per split and class
    for split in ("train", "val", "test"):
        for cls, n in manifest.counts["fer2013"][split].items():
            assert n == sum(1 for r in rows if r["split"] == split and r["label_name"] == cls)


def test_hostile_folder_local_and_s3_stores(tmp_path, s3_env, s3_prefix):
    root = tmp_path / "fer"
    fates = hostile_fer(root)
    config = fer_only(str(root))
    local = Store(str(tmp_path / "store"))
    manifest = prepare(config, local)
    check_accounting(root, fates, manifest, local)
    assert not manifest.skipped
    # val is carved out of train (given test kept as is), stratified: every class keeps train rows
    counts = manifest.counts["fer2013"]
    assert sum(counts["val"].values()) > 0
    assert all(n > 0 for n in counts["train"].values())
    assert sum(counts["test"].values()) == 7 * 3

    remote = Store(s3_prefix)
    s3_manifest = prepare(config, remote)
    check_accounting(root, fates, s3_manifest, remote)
    assert s3_manifest.dataset_id == manifest.dataset_id
    prefix = dataset_key(manifest.dataset_id)
    local_files, s3_files = local.list_files(prefix), remote.list_files(prefix)
    assert local_files == s3_files
    for key in local_files:
        if key.endswith(".parquet"):
            assert local.read_bytes(key) == remote.read_bytes(key), key


def test_source_on_s3_gives_the_same_dataset(tmp_path, s3_env, s3_prefix):
    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=4, test_per_class=2, seed=5)
    source = Store(f"{s3_prefix}/source")
    for path in root.rglob("*.jpg"):
        source.write_bytes(str(path.relative_to(root)), path.read_bytes())
    local_id = prepare(fer_only(str(root)), Store(str(tmp_path / "a"))).dataset_id
    s3_manifest = prepare(fer_only(source.uri), Store(str(tmp_path / "b")))
    assert s3_manifest.dataset_id == local_id
    assert s3_manifest.totals.accepted == 7 * 6


def _prepared_fer(tmp_path: Path, per_class: int, seed: int) -> tuple[Path, Store, DatasetManifest, str]:
    """Generated FER-like faces prepared into a local store: (root, store, manifest, dataset key)."""
    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=per_class, test_per_class=2, seed=seed)
    store = Store(str(tmp_path / "store"))
    manifest = prepare(fer_only(str(root)), store)
    return root, store, manifest, dataset_key(manifest.dataset_id)


def test_rerun_does_no_work_and_same_input_same_bytes(tmp_path):
    root, store, first, prefix = _prepared_fer(tmp_path, per_class=8, seed=1)
    stamps = {k: Path(store.path(k)).stat().st_mtime_ns for k in store.list_files(prefix)}
    second = prepare(fer_only(str(root)), store)
    assert second.skipped and second.dataset_id == first.dataset_id
    assert {k: Path(store.path(k)).stat().st_mtime_ns for k in store.list_files(prefix)} == stamps
    # a second store from the same input: same id, byte-identical shards
    other = Store(str(tmp_path / "other"))
    assert prepare(fer_only(str(root)), other).dataset_id == first.dataset_id
    for key in stamps:
        if key.endswith(".parquet"):
            assert other.read_bytes(key) == store.read_bytes(key)
    # a different split seed is a different dataset
    assert prepare(fer_only(str(root), split_seed=99), other).dataset_id != first.dataset_id


def test_interrupted_write_is_redone_not_trusted(tmp_path):
    root, store, manifest, prefix = _prepared_fer(tmp_path, per_class=4, seed=2)
    good = {k: store.read_bytes(k) for k in store.list_files(prefix)}
    # simulate a crash: manifest gone, a half-written shard and a stray one left behind
    Path(store.path(f"{prefix}/manifest.json")).unlink()
    shard = next(k for k in good if k.endswith(".parquet"))
    Path(store.path(shard)).write_bytes(good[shard][:100])
    store.write_bytes(f"{prefix}/shards/train/part-stray-00009.parquet", b"junk")
    again = prepare(fer_only(str(root)), store)
    assert not again.skipped
    assert {k: store.read_bytes(k) for k in store.list_files(prefix)} == good


def test_no_split_dataset_gets_stratified_train_val_test(tmp_path):
    root = tmp_path / "fane"
    synth.write_fane_like(root, per_class=20, seed=4)
    config = load_config(None, {"fane": str(root)})
    config.data.domains = [config.domain("fane")]
    manifest = prepare(config, Store(str(tmp_path / "store")))
    counts = manifest.counts["fane"]
    for cls in config.domain("fane").classes:
        assert counts["train"][cls] + counts["val"][cls] + counts["test"][cls] == 20
        assert counts["test"][cls] == 3 and counts["val"][cls] == 2  # 15% and 10% of 20


def test_bad_sources_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(DataError, match=r"fer2013: no files under .*empty"):
        prepare(fer_only(str(empty)), Store(str(tmp_path / "store")))
    (tmp_path / "notest" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"split folder 'test' not found at .*notest/test"):
        prepare(fer_only(str(tmp_path / "notest")), Store(str(tmp_path / "store")))


def test_wrong_s3_credentials_fail_before_work(tmp_path, s3_env, s3_prefix, monkeypatch):
    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=2, test_per_class=1, seed=2)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    with pytest.raises(MdferError) as error:
        prepare(fer_only(str(root)), Store(s3_prefix))
    message = str(error.value)
    assert message.startswith(s3_prefix)
    assert "wrong-secret-value-123" not in message and s3_env.access_key not in message


def test_train_far_blurrier_than_test_is_a_warning_with_figures(tmp_path, caplog):
    """The shift that sank the first real run (fer2013-dev's train images are all blurred)."""
    from PIL import ImageFilter

    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=10, test_per_class=3, seed=5)
    store = Store(str(tmp_path / "store"))
    sharp = prepare(fer_only(str(root)), store)
    assert sharp.warnings == []
    for path in (root / "train").rglob("*.jpg"):
        with Image.open(path) as image:
            image.filter(ImageFilter.GaussianBlur(2.5)).save(path, quality=95)

    with caplog.at_level("WARNING", logger="mdfer.ingest"):
        blurred = prepare(fer_only(str(root)), store)
    stats = blurred.sharpness["fer2013"]
    assert set(stats) == {"train", "val", "test"} and stats["test"].n == 7 * 3
    assert stats["train"].p10 <= stats["train"].p50 <= stats["train"].p90
    assert stats["test"].p50 == sharp.sharpness["fer2013"]["test"].p50  # test untouched
    assert stats["test"].p50 > 4 * stats["train"].p50
    [warning] = blurred.warnings
    assert warning.startswith("fer2013: the train images are ") and "blurrier than the test images" in warning
    assert stats["val"].p50 < 4 * stats["train"].p50  # carved from train: blurred alike, no warning
    assert f"{stats['test'].p50}" in warning and "model.inference_lowpass" in warning
    assert warning in caplog.text
    assert any(line.startswith("  fer2013 median sharpness") for line in blurred.summary_lines())
    caplog.clear()
    with caplog.at_level("WARNING", logger="mdfer.ingest"):
        assert prepare(fer_only(str(root)), store).skipped
    assert warning in caplog.text  # said again when the dataset is reused


# --- what else a user's disk holds: links, odd names, bit depths, huge images, tiny classes ---


def test_links_and_odd_names_each_one_entry_with_its_fate(tmp_path):
    """File links are followed; folder links (a loop up the tree, a class under another name) are
    not; broken links, link loops and non-UTF-8 names are rejected with a reason; nothing aborts
    the scan and scanned = accepted + rejected + duplicates stays exact."""
    import os

    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=3, test_per_class=1, seed=7)
    train = root / "train"
    outside = tmp_path / "outside.jpg"
    shutil.copy(next((train / "happy").glob("*.jpg")), outside)
    os.symlink(outside, train / "sad" / "linked_from_outside.jpg")   # a file link: followed
    os.symlink(root, train / "angry" / "loop")                       # back up the tree
    os.symlink(train / "happy", train / "contempt")                  # an unknown class, via a link
    os.symlink(tmp_path / "gone.jpg", train / "fear" / "dangling.jpg")
    os.symlink("self.jpg", train / "fear" / "self.jpg")              # a link to itself
    bad_file = os.fsencode(train / "neutral") + b"/caf\xe9.jpg"      # Latin-1, not UTF-8
    with open(bad_file, "wb") as f:
        f.write(next((train / "neutral").glob("*.jpg")).read_bytes())
    os.mkdir(os.fsencode(train) + b"/\xff-folder")

    manifest = prepare(fer_only(str(root)), Store(str(tmp_path / "store")))
    rejected = {r.path: r.reason for r in manifest.rejected}
    assert rejected == {
        "train/angry/loop": "link to a folder (not followed)",
        "train/contempt": "link to a folder (not followed)",
        "train/fear/dangling.jpg": "broken link (its target is missing)",
        "train/fear/self.jpg": "link loop",
        "train/neutral/caf\\xe9.jpg": "file name is not valid UTF-8",
        "train/\\xff-folder": "folder name is not valid UTF-8",
    }
    totals = manifest.totals
    plain_files = 7 * (3 + 1)
    assert totals.scanned == plain_files + 1 + len(rejected)  # + the followed file link
    assert totals.scanned == totals.accepted + totals.rejected + totals.duplicates
    # the followed link is a byte copy of a happy image: a duplicate with a conflicting label
    [dup] = manifest.duplicates
    assert "train/sad/linked_from_outside.jpg" in [dup.kept, *dup.dropped] and dup.conflicting_labels
    assert totals.accepted == plain_files


def _encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 1-bit pixels, with no pixel data after it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_every_pillow_mode_decodes_to_the_right_8_bit_image_or_is_refused(tmp_path):
    import numpy as np

    from mdfer.images import decode_image

    ramp16 = (np.arange(48 * 48, dtype=np.uint32).reshape(48, 48) * 28).astype(np.uint16)  # 0..64484
    expected8 = np.round(ramp16 / 257).astype(np.uint8)
    gray = Image.fromarray(expected8, "L")
    cases = {
        "I;16 png": (_encoded(Image.fromarray(ramp16), "PNG"), expected8),
        "I tiff": (_encoded(Image.fromarray(ramp16.astype(np.int32), "I"), "TIFF"), expected8),
        "F tiff 0..1": (_encoded(Image.fromarray((ramp16 / 65535).astype(np.float32), "F"), "TIFF"),
                        np.round(ramp16 / 65535 * 255).astype(np.uint8)),
        "F tiff 0..255": (_encoded(Image.fromarray(expected8.astype(np.float32), "F"), "TIFF"), expected8),
        "P png": (_encoded(gray.convert("P"), "PNG"), expected8),
        "LA png": (_encoded(gray.convert("LA"), "PNG"), expected8),
        "1 png": (_encoded(gray.point(lambda v: 255 if v > 127 else 0).convert("1"), "PNG"),
                  np.where(expected8 > 127, 255, 0).astype(np.uint8)),
        "CMYK tiff": (_encoded(gray.convert("RGB").convert("CMYK"), "TIFF"), expected8),
    }
    for name, (data, want) in cases.items():
        got = np.asarray(decode_image(data, 48))
        assert got.shape == (48, 48, 3) and got.dtype == np.uint8, name
        assert np.abs(got[..., 0].astype(int) - want).max() <= 1, (name, np.abs(got[..., 0].astype(int) - want).max())

    # in `prepare`: accepted as decoded above, or rejected with a reason; a bomb is never decoded
    root = tmp_path / "modes"
    synth.write_fer_like(root, train_per_class=2, test_per_class=1, seed=8)
    happy = root / "train" / "happy"
    for name, (data, _) in cases.items():
        (happy / f"{name.replace(' ', '_').replace(';', '')}.{name.split()[1][:4]}").write_bytes(data)
    (happy / "hot.tiff").write_bytes(_encoded(Image.fromarray(expected8.astype(np.float32) * 1000, "F"), "TIFF"))
    (happy / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))   # 900 megapixels claimed
    (happy / "big.png").write_bytes(_encoded(Image.new("L", (300, 200), 9).point(lambda v: v), "PNG"))
    config = fer_only(str(root), max_image_pixels=50_000)
    manifest = prepare(config, Store(str(tmp_path / "store")))
    rejected = {r.path.split("/")[-1]: r.reason for r in manifest.rejected}
    assert rejected["hot.tiff"].startswith("unsupported pixels: float pixels above 255")
    assert rejected["bomb.png"].startswith("too large: ") and "Pillow refuses it" in rejected["bomb.png"]
    assert rejected["big.png"] == "too large: 300x200 = 0.06 megapixels > data.max_image_pixels (0.05 M)"
    assert len(rejected) == 3  # every other mode was accepted
    assert manifest.counts["fer2013"]["train"]["happy"] + manifest.counts["fer2013"]["val"]["happy"] == 2 + len(cases)


def test_tiny_classes_and_empty_splits_are_warned(tmp_path, caplog):
    root = tmp_path / "tiny"
    synth.write_fer_like(root, train_per_class=1, test_per_class=1, seed=9)
    with caplog.at_level("WARNING", logger="mdfer.ingest"):
        manifest = prepare(fer_only(str(root)), Store(str(tmp_path / "store")))
    assert sum(manifest.counts["fer2013"]["val"].values()) == 0  # one image per class: none to carve
    assert "fer2013: the val split is empty (7 train images)" in manifest.warnings[0]
    assert manifest.warnings[0] in caplog.text
    synth.write_fer_like(root, train_per_class=12, test_per_class=1, seed=9)
    for path in sorted((root / "train" / "disgust").glob("*.jpg"))[1:]:
        path.unlink()  # one disgust image left: it stays in train
    warned = prepare(fer_only(str(root)), Store(str(tmp_path / "store2"))).warnings
    assert warned == ["fer2013: no validation image of class disgust (training has 1): "
                      "its F1 on validation is 0 whatever the model does"]
