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
from mdfer.errors import DataError, MdferError
from mdfer.ingest import dataset_key, prepare
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


def read_rows(store: Store, manifest: dict) -> list[dict]:
    rows = []
    for split, shards in manifest["shards"].items():
        for shard in shards:
            data = store.read_bytes(f"{dataset_key(manifest['dataset_id'])}/{shard['file']}")
            rows += pq.read_table(io.BytesIO(data)).to_pylist()
    return rows


def check_accounting(root: Path, fates: dict[str, str], manifest: dict, store: Store) -> None:
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    totals = manifest["totals"]
    assert totals["scanned"] == len(on_disk)
    assert totals["scanned"] == totals["accepted"] + totals["rejected"] + totals["duplicates"]
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    dropped = {p for d in manifest["duplicates"] for p in d["dropped"]}
    rows = read_rows(store, manifest)
    accepted = {r["source_path"] for r in rows}
    assert len(rows) == totals["accepted"] == len(accepted)
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
    conflicts = [d for d in manifest["duplicates"] if d["conflicting_labels"]]
    assert [d["dropped"] for d in conflicts] == [["train/happy/dup_conflict.jpg"]]
    assert conflicts[0]["labels"] == ["happy", "sad"] and conflicts[0]["kept"].startswith("test/sad/")
    # no image of val or test also in train
    hashes = {s: {r["content_hash"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["val"]
    # counts agree with the rows, per split and class
    for split in ("train", "val", "test"):
        for cls, n in manifest["counts"]["fer2013"][split].items():
            assert n == sum(1 for r in rows if r["split"] == split and r["label_name"] == cls)


def test_hostile_folder_local_and_s3_stores(tmp_path, s3_env, s3_prefix):
    root = tmp_path / "fer"
    fates = hostile_fer(root)
    config = fer_only(str(root))
    local = Store(str(tmp_path / "store"))
    manifest = prepare(config, local)
    check_accounting(root, fates, manifest, local)
    assert not manifest["skipped"]
    # val is carved out of train (given test kept as is), stratified: every class keeps train rows
    counts = manifest["counts"]["fer2013"]
    assert sum(counts["val"].values()) > 0
    assert all(n > 0 for n in counts["train"].values())
    assert sum(counts["test"].values()) == 7 * 3

    remote = Store(s3_prefix)
    s3_manifest = prepare(config, remote)
    check_accounting(root, fates, s3_manifest, remote)
    assert s3_manifest["dataset_id"] == manifest["dataset_id"]
    prefix = dataset_key(manifest["dataset_id"])
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
    local_id = prepare(fer_only(str(root)), Store(str(tmp_path / "a")))["dataset_id"]
    s3_manifest = prepare(fer_only(source.uri), Store(str(tmp_path / "b")))
    assert s3_manifest["dataset_id"] == local_id
    assert s3_manifest["totals"]["accepted"] == 7 * 6


def test_rerun_does_no_work_and_same_input_same_bytes(tmp_path):
    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=8, test_per_class=2, seed=1)
    store = Store(str(tmp_path / "store"))
    first = prepare(fer_only(str(root)), store)
    prefix = dataset_key(first["dataset_id"])
    stamps = {k: Path(store.path(k)).stat().st_mtime_ns for k in store.list_files(prefix)}
    second = prepare(fer_only(str(root)), store)
    assert second["skipped"] and second["dataset_id"] == first["dataset_id"]
    assert {k: Path(store.path(k)).stat().st_mtime_ns for k in store.list_files(prefix)} == stamps
    # a second store from the same input: same id, byte-identical shards
    other = Store(str(tmp_path / "other"))
    assert prepare(fer_only(str(root)), other)["dataset_id"] == first["dataset_id"]
    for key in stamps:
        if key.endswith(".parquet"):
            assert other.read_bytes(key) == store.read_bytes(key)
    # a different split seed is a different dataset
    assert prepare(fer_only(str(root), split_seed=99), other)["dataset_id"] != first["dataset_id"]


def test_interrupted_write_is_redone_not_trusted(tmp_path):
    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=4, test_per_class=2, seed=2)
    store = Store(str(tmp_path / "store"))
    manifest = prepare(fer_only(str(root)), store)
    prefix = dataset_key(manifest["dataset_id"])
    good = {k: store.read_bytes(k) for k in store.list_files(prefix)}
    # simulate a crash: manifest gone, a half-written shard and a stray one left behind
    Path(store.path(f"{prefix}/manifest.json")).unlink()
    shard = next(k for k in good if k.endswith(".parquet"))
    Path(store.path(shard)).write_bytes(good[shard][:100])
    store.write_bytes(f"{prefix}/shards/train/part-stray-00009.parquet", b"junk")
    again = prepare(fer_only(str(root)), store)
    assert not again["skipped"]
    assert {k: store.read_bytes(k) for k in store.list_files(prefix)} == good


def test_no_split_dataset_gets_stratified_train_val_test(tmp_path):
    root = tmp_path / "fane"
    synth.write_fane_like(root, per_class=20, seed=4)
    config = load_config(None, {"fane": str(root)})
    config.data.domains = [config.domain("fane")]
    manifest = prepare(config, Store(str(tmp_path / "store")))
    counts = manifest["counts"]["fane"]
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

    from mdfer.ingest import summary_lines

    root = tmp_path / "fer"
    synth.write_fer_like(root, train_per_class=10, test_per_class=3, seed=5)
    store = Store(str(tmp_path / "store"))
    sharp = prepare(fer_only(str(root)), store)
    assert sharp["warnings"] == []
    for path in (root / "train").rglob("*.jpg"):
        with Image.open(path) as image:
            image.filter(ImageFilter.GaussianBlur(2.5)).save(path, quality=95)

    with caplog.at_level("WARNING", logger="mdfer.ingest"):
        blurred = prepare(fer_only(str(root)), store)
    stats = blurred["sharpness"]["fer2013"]
    assert set(stats) == {"train", "val", "test"} and stats["test"]["n"] == 7 * 3
    assert stats["train"]["p10"] <= stats["train"]["p50"] <= stats["train"]["p90"]
    assert stats["test"]["p50"] == sharp["sharpness"]["fer2013"]["test"]["p50"]  # test untouched
    assert stats["test"]["p50"] > 4 * stats["train"]["p50"]
    [warning] = blurred["warnings"]
    assert warning.startswith("fer2013: the train images are ") and "blurrier than the test images" in warning
    assert stats["val"]["p50"] < 4 * stats["train"]["p50"]  # carved from train: blurred alike, no warning
    assert f"{stats['test']['p50']}" in warning and "model.inference_lowpass" in warning
    assert warning in caplog.text
    assert any(line.startswith("  fer2013 median sharpness") for line in summary_lines(blurred))
    caplog.clear()
    with caplog.at_level("WARNING", logger="mdfer.ingest"):
        assert prepare(fer_only(str(root)), store)["skipped"]
    assert warning in caplog.text  # said again when the dataset is reused
