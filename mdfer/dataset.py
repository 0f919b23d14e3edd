"""A prepared dataset, read: its typed manifest and the decoded images of its splits.

`mdfer prepare` (mdfer.ingest) writes a dataset; every later step (the training stream, the
run checks, evaluate, export, the benchmarks) reads it here, so the manifest's shape is spelled
once. The JSON in the store is what prepare has always written: `to_dict` gives it back key for
key, and a manifest that lacks a key or holds a wrong type is one error naming file and key.
"""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdfer.config import build_typed
from mdfer.errors import ConfigError, DataError, MdferError
from mdfer.images import EVAL_BATCH, DecodeBatch
from mdfer.layout import MANIFEST_FILE, dataset_key
from mdfer.storage import Store

SHARPNESS_SIDE = 48  # px: every image's sharpness is measured at this size, so datasets of any resolution compare


@dataclass(frozen=True)
class Shard:
    file: str  # relative to the dataset's folder (mdfer.layout.shard_file)
    domain: str
    rows: int


@dataclass(frozen=True)
class DomainClasses:
    classes: list[str]  # in the order of the dataset's label indices


@dataclass(frozen=True)
class Totals:
    """scanned = accepted + rejected + duplicates, exactly."""

    scanned: int
    accepted: int
    rejected: int
    duplicates: int  # files dropped as byte-identical copies
    duplicate_groups: int
    conflicting_label_groups: int


@dataclass(frozen=True)
class Rejected:
    domain: str
    path: str  # relative to the dataset's root
    split: str  # the split folder it was found in
    reason: str


@dataclass(frozen=True)
class DuplicateGroup:
    """Byte-identical files of one dataset: one kept (in the split that matters most), the rest dropped."""

    domain: str
    content_hash: str
    kept: str
    dropped: list[str]
    labels: list[str]
    conflicting_labels: bool
    splits: list[str]


@dataclass(frozen=True)
class Sharpness:
    """The spread of a split's sharpness (ingest.sharpness: Laplacian variance at SHARPNESS_SIDE px)."""

    n: int
    p10: float
    p50: float
    p90: float


@dataclass(frozen=True)
class DatasetManifest:
    """manifest.json of a prepared dataset; written last, so its presence means the dataset is whole."""

    dataset_id: str
    schema_version: int
    mdfer_version: str
    config: dict[str, Any]  # the `data` section of the config it was prepared with (a record)
    domains: dict[str, DomainClasses]  # in the config's dataset order
    counts: dict[str, dict[str, dict[str, int]]]  # dataset -> split -> class -> images
    totals: Totals
    rejected: list[Rejected]
    duplicates: list[DuplicateGroup]
    shards: dict[str, list[Shard]]  # split -> its shards, in the order they were written
    sharpness: dict[str, dict[str, Sharpness]] = field(default_factory=dict)  # older manifests lack it
    warnings: list[str] = field(default_factory=list)  # older manifests lack them
    skipped: bool = False  # set by `prepare` when it found the dataset complete; not part of the file

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> DatasetManifest:
        """The manifest in `raw` (parsed JSON); `source` names the file in errors."""
        try:
            return build_typed(cls, raw, "", source)
        except ConfigError as exc:  # the config's checks, by dotted key; here it is the data that is bad
            raise DataError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON manifest.json holds."""
        out = dataclasses.asdict(self)
        out.pop("skipped")
        return out

    def classes(self) -> dict[str, list[str]]:
        """Each dataset's class list, in the manifest's dataset order."""
        return {name: domain.classes for name, domain in self.domains.items()}

    def split_sizes(self, split: str) -> dict[str, int]:
        """Images of `split` per dataset."""
        return {name: sum(counts.get(split, {}).values()) for name, counts in self.counts.items()}

    def shard_keys(self, split: str, domain: str | None = None) -> list[str]:
        """Store keys of the split's shards (of one dataset, or all), in the order they were written."""
        return [dataset_key(self.dataset_id, s.file) for s in self.shards.get(split, [])
                if domain is None or s.domain == domain]

    def summary_lines(self) -> list[str]:
        """Human-readable counts for the CLI."""
        totals = self.totals
        lines = [f"dataset {self.dataset_id}: scanned {totals.scanned} = accepted {totals.accepted} + rejected "
                 f"{totals.rejected} + duplicates {totals.duplicates} ({totals.duplicate_groups} groups, "
                 f"{totals.conflicting_label_groups} with conflicting labels)"]
        for domain, splits in self.counts.items():
            sizes = ", ".join(f"{s} {sum(c.values())}" for s, c in splits.items())
            lines.append(f"  {domain}: {sizes}")
        for domain, stats in self.sharpness.items():
            medians = ", ".join(f"{s} {v.p50}" for s, v in stats.items())
            lines.append(f"  {domain} median sharpness (Laplacian variance at {SHARPNESS_SIDE} px): {medians}")
        reasons = Counter(r.reason.split(":")[0] for r in self.rejected)
        for reason, n in sorted(reasons.items()):
            lines.append(f"  rejected {n}: {reason}")
        return lines


def read_manifest(store: Store, dataset_id: str) -> DatasetManifest:
    """The manifest of a complete dataset in the store; a clear error when there is none."""
    key = dataset_key(dataset_id, MANIFEST_FILE)
    if not store.exists(key):
        raise DataError(f"{store.key_uri(key)}: no complete dataset {dataset_id!r} in this store "
                        f"(run `mdfer prepare` first)")
    return DatasetManifest.from_dict(store.read_json(key), store.key_uri(key))


def iter_split(store: Store, manifest: DatasetManifest, split: str, image_size: int,
               batch_size: int = EVAL_BATCH, rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of one split, shard by shard, in the order they were written.
    `rows`: only these sorted row numbers of the split (counted over its shards in order), and
    only they are decoded."""
    import pyarrow.parquet as pq
    if split not in manifest.shards:
        raise MdferError(f"dataset {manifest.dataset_id} has no split {split!r} "
                         f"(it has {', '.join(manifest.shards)})")
    decode = DecodeBatch(image_size)
    offset = 0
    for key in manifest.shard_keys(split):
        table = pq.read_table(io.BytesIO(store.read_bytes(key)), columns=["image", "domain_index", "label"])
        if rows is not None:
            local = rows[(rows >= offset) & (rows < offset + table.num_rows)] - offset
            offset += table.num_rows
            table = table.take(local)
        for start in range(0, table.num_rows, batch_size):
            chunk = table.slice(start, batch_size)
            yield decode({name: chunk.column(name).to_numpy(zero_copy_only=False)
                          for name in ("image", "domain_index", "label")})


def split_images(store: Store, manifest: DatasetManifest, split: str, size: int,
                 limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to `limit` (0: all) decoded images of a split with their domain and label, spread
    evenly over the split: shards are written dataset by dataset and class by class, so the
    first rows would be one or two classes (and a misleading macro-F1)."""
    total = sum(s.rows for s in manifest.shards.get(split, []))
    rows = np.linspace(0, total - 1, limit).round().astype(int) if 0 < limit < total else None
    parts = list(iter_split(store, manifest, split, size, rows=rows))
    if not parts:
        raise MdferError(f"dataset {manifest.dataset_id}: split {split!r} is empty")
    return tuple(np.concatenate([p[k] for p in parts]) for k in ("image", "domain", "label"))
