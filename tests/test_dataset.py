"""The typed dataset manifest (mdfer.dataset): what prepare writes reads back key for key, an
older manifest still reads, and a damaged one is one line naming the file and the key."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mdfer.dataset import DatasetManifest, Shard, read_manifest, split_images
from mdfer.errors import DataError
from mdfer.layout import MANIFEST_FILE, dataset_key


def _stored(synth_dataset) -> tuple[Path, bytes]:
    store, manifest = synth_dataset["store"], synth_dataset["manifest"]
    path = Path(store.path(dataset_key(manifest.dataset_id, MANIFEST_FILE)))
    return path, path.read_bytes()


def test_what_prepare_writes_reads_back_key_for_key(synth_dataset):
    store, manifest = synth_dataset["store"], synth_dataset["manifest"]
    path, data = _stored(synth_dataset)
    raw = json.loads(data)
    assert manifest.to_dict() == raw and "skipped" not in raw  # the run's own flag stays out of the file
    again = read_manifest(store, manifest.dataset_id)
    assert again == manifest and again.to_dict() == raw
    assert (json.dumps(again.to_dict(), indent=2, sort_keys=True) + "\n").encode() == data  # as the store writes it
    assert set(raw) == {"dataset_id", "schema_version", "mdfer_version", "config", "domains", "counts", "totals",
                        "sharpness", "warnings", "rejected", "duplicates", "shards"}
    # typed: the readers' questions answered in one place
    assert manifest.classes() == {d.name: d.classes for d in synth_dataset["config"].data.domains}
    assert isinstance(manifest.shards["train"][0], Shard)
    assert sum(manifest.split_sizes("test").values()) == sum(s.rows for s in manifest.shards["test"])
    assert all(key.startswith(dataset_key(manifest.dataset_id, "shards/train/")) for key in manifest.shard_keys("train"))
    assert manifest.shard_keys("train", "fane") and all("-fane-" in k for k in manifest.shard_keys("train", "fane"))


def test_an_older_manifest_without_sharpness_or_warnings_reads(synth_dataset):
    raw = json.loads(_stored(synth_dataset)[1])
    del raw["sharpness"], raw["warnings"]
    older = DatasetManifest.from_dict(raw, "old/manifest.json")
    assert older.sharpness == {} and older.warnings == []
    assert not any("sharpness" in line for line in older.summary_lines())


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw["totals"].pop("scanned"), "totals.scanned: required key is missing"),
    (lambda raw: raw["shards"]["train"][0].update(rows="3"), "shards.train[0].rows: expected int, got str '3'"),
    (lambda raw: raw.update(domains=["fer2013"]), "domains: expected a mapping, got list"),
    (lambda raw: raw.update(shards_v2={}), "shards_v2: unknown key"),
])
def test_a_damaged_manifest_is_one_line_naming_file_and_key(synth_dataset, tmp_path, damage, words):
    from mdfer.storage import Store

    manifest = synth_dataset["manifest"]
    raw = copy.deepcopy(manifest.to_dict())
    damage(raw)
    store = Store(str(tmp_path / "store"))
    key = dataset_key(manifest.dataset_id, MANIFEST_FILE)
    store.write_json(key, raw)
    with pytest.raises(DataError) as error:
        read_manifest(store, manifest.dataset_id)
    message = str(error.value)
    assert message.startswith(f"{store.key_uri(key)}: {words}"), message
    assert "\n" not in message


def test_a_missing_dataset_says_to_prepare_it(tmp_path):
    from mdfer.storage import Store

    with pytest.raises(DataError, match=r"no complete dataset 'ds-nope' in this store \(run `mdfer prepare` first\)"):
        read_manifest(Store(str(tmp_path)), "ds-nope")


def test_image_samples_spread_over_the_whole_split(synth_dataset):
    """Shards are written class by class: a limited sample must not be the first classes only."""
    store, manifest = synth_dataset["store"], synth_dataset["manifest"]
    _, all_domains, all_labels = split_images(store, manifest, "test", 32, 0)
    limit = len(all_labels) // 3
    images, domains, labels = split_images(store, manifest, "test", 32, limit)
    assert images.shape == (limit, 32, 32, 3) and len(domains) == len(labels) == limit
    assert {*zip(domains, labels)} == {*zip(all_domains, all_labels)}  # every (dataset, class) pair
