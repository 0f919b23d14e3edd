"""`mdfer prepare`: class-folder datasets -> validated, de-duplicated, split Parquet shards.

Three passes, each with one job: scan (read, hash, decode every file; decide accept/reject),
plan (drop duplicates, keep given splits, carve the missing ones, stratified and seeded), write
(shards, then manifest.json last). Every scanned file ends up in exactly one of accepted,
rejected or duplicates, and the manifest says which and why. This module only writes a dataset;
every later step reads it through mdfer.dataset (whose `DatasetManifest` is what is written here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

import mdfer
from mdfer.config import GIVEN_SPLIT_NAMES, WHOLE_DATASET, Config, DomainConfig, require_roots
from mdfer.dataset import (SHARPNESS_SIDE, DatasetManifest, DomainClasses, DuplicateGroup, Rejected, Shard,
                           Sharpness, Totals, read_manifest)
from mdfer.errors import DataError
from mdfer.images import to_rgb8
from mdfer.layout import MANIFEST_FILE, SHARDS_DIR, dataset_key, shard_file
from mdfer.listing import Listed, list_local
from mdfer.logs import Progress, redact
from mdfer.storage import Store, resolve, storage_error

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLITS = GIVEN_SPLIT_NAMES
SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2, WHOLE_DATASET: 3}  # who keeps a duplicate
READ_THREADS = 8
MAX_FILE_BYTES = 256 * 2**20  # a face image is never this big; reading it whole would cost the memory
SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("domain", pa.string()),
    ("domain_index", pa.int32()),
    ("label", pa.int32()),
    ("label_name", pa.string()),
    ("split", pa.string()),
    ("source_path", pa.string()),
    ("content_hash", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])


@dataclass
class ScannedFile:
    domain: str
    given_split: str  # train/val/test from the folder layout, or "all"
    path: str  # relative to the dataset root
    size: int
    content_hash: str = ""
    label_name: str = ""
    width: int = 0
    height: int = 0
    sharpness: float = 0.0  # see `sharpness`
    reason: str = ""  # why it was rejected; empty when accepted


@dataclass
class Plan:
    """Which accepted file goes to which split; what was dropped and why."""

    rows: list[tuple[ScannedFile, str]] = field(default_factory=list)  # (file, split)
    rejected: list[Rejected] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    scanned: int = 0


# ---------------------------------------------------------------- scan

SHARPNESS_SHIFT = 4.0  # a split this many times blurrier or sharper than its train split is a warning


def sharpness(gray: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian at SHARPNESS_SIDE px: ~0 for a blurred face,
    hundreds to thousands for a sharp one. A train split far blurrier than test (the
    fer2013-dev train set is) teaches the model a look it will not meet at test or in use."""
    pixels = np.asarray(gray.resize((SHARPNESS_SIDE, SHARPNESS_SIDE), Image.BILINEAR), np.float32)
    laplacian = (pixels[:-2, 1:-1] + pixels[2:, 1:-1] + pixels[1:-1, :-2] + pixels[1:-1, 2:]
                 - 4 * pixels[1:-1, 1:-1])
    return float(laplacian.var())


def _list_domain(domain: DomainConfig) -> list[Listed]:
    """Every entry in the domain's split folders (local: see `listing.list_local`; s3://: every object)."""
    fs, root = resolve(domain.root)
    found = []
    for split, folder in sorted(domain.splits.items()):
        base = posixpath.join(root, folder) if folder else root  # "": the root holds the class folders
        where = f"{domain.root}/{folder}" if folder else domain.root
        try:
            info = fs.get_file_info(base)
            if info.type != pafs.FileType.Directory:
                raise DataError(f"{domain.name}: split folder {folder!r} not found at {where}"
                                if folder else f"{domain.name}: {where} is not a folder")
            if isinstance(fs, pafs.LocalFileSystem):
                found += list_local(root, split, folder)
                continue
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        except DataError:
            raise
        except Exception as exc:
            raise storage_error(where, exc) from None
        found += [Listed(split, i.path[len(root) + 1:], i.size) for i in infos if i.type == pafs.FileType.File]
    return sorted(found, key=lambda f: f.path)


def _inspect(domain: DomainConfig, fs: pafs.FileSystem, root: str, listed: Listed, min_side: int,
             max_pixels: int) -> ScannedFile:
    """Read, hash and fully decode one file; set `reason` if it cannot be used."""
    scanned = ScannedFile(domain.name, listed.split, listed.path, listed.size)
    if listed.problem:
        scanned.reason = listed.problem
        return scanned
    folder = domain.splits[listed.split]
    parts = listed.path[len(folder):].strip("/").split("/")
    if len(parts) < 2:
        scanned.reason = "not inside a class folder"
        return scanned
    class_folder = parts[0]
    folder_map = {k.lower(): v for k, v in domain.folders.items()}
    if listed.size > MAX_FILE_BYTES:
        scanned.reason = f"file too large: {listed.size / 2**20:.0f} MiB > {MAX_FILE_BYTES / 2**20:.0f} MiB"
        return scanned
    try:
        with fs.open_input_stream(posixpath.join(root, listed.path)) as f:
            data = f.read()
    except Exception as exc:
        scanned.reason = "unreadable: " + (redact(str(exc)).splitlines() or [type(exc).__name__])[0]
        return scanned
    scanned.content_hash = hashlib.sha256(data).hexdigest()
    if class_folder.lower() not in folder_map:
        scanned.reason = f"unknown class folder {class_folder!r}"
        return scanned
    scanned.label_name = folder_map[class_folder.lower()]
    if not data:
        scanned.reason = "empty file (0 bytes)"
        return scanned
    try:
        with Image.open(io.BytesIO(data)) as image:
            scanned.width, scanned.height = image.size  # from the header: nothing decoded yet
            pixels = scanned.width * scanned.height
            if pixels > max_pixels:
                scanned.reason = (f"too large: {scanned.width}x{scanned.height} = {pixels / 1e6:.3g} megapixels "
                                  f"> data.max_image_pixels ({max_pixels / 1e6:.3g} M)")
                return scanned
            image.load()
            try:
                gray = to_rgb8(image).convert("L")
            except ValueError as exc:
                scanned.reason = f"unsupported pixels: {exc}"
                return scanned
    except Image.DecompressionBombError as exc:  # beyond Pillow's own hard limit, before decoding
        scanned.reason = f"too large: {str(exc).split('(')[-1].split(')')[0]} (Pillow refuses it)"
        return scanned
    except UnidentifiedImageError:
        scanned.reason = "not an image"
        return scanned
    except (OSError, SyntaxError, ValueError) as exc:
        scanned.reason = f"truncated or corrupt image: {exc}".splitlines()[0]
        return scanned
    extrema = gray.getextrema()
    scanned.sharpness = sharpness(gray)
    if min(scanned.width, scanned.height) < min_side:
        scanned.reason = f"too small: {scanned.width}x{scanned.height} < {min_side} px"
    elif extrema[0] == extrema[1]:
        scanned.reason = f"blank image (every pixel {extrema[0]})"
    return scanned


def scan(config: Config) -> list[ScannedFile]:
    """Every file of every dataset, inspected in parallel threads (I/O and PIL release the GIL)."""
    jobs = []
    for domain in config.data.domains:
        listed = _list_domain(domain)
        if not listed:
            raise DataError(f"{domain.name}: no files under {domain.root} "
                            f"(looked in {', '.join(sorted(domain.splits.values()))})")
        fs, root = resolve(domain.root)
        jobs += [(domain, fs, root, entry) for entry in listed]
    limits = (config.data.min_image_side, config.data.max_image_pixels)
    # data.max_image_pixels decides, from the header; Pillow's own warning below its hard limit
    # would only repeat that (set here, once: the filter list is global, the threads share it)
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    with ThreadPoolExecutor(READ_THREADS) as pool, Progress("scan", len(jobs), "file") as bar:
        results = []
        for result in pool.map(lambda job: _inspect(*job, *limits), jobs):
            results.append(result)
            bar.advance()
    return results


# ---------------------------------------------------------------- plan


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _carve(files: list[ScannedFile], fraction: float, seed: int, tag: str) -> tuple[list, list]:
    """Stratified, seeded split: (kept, carved) with `fraction` of each class carved out."""
    by_class: dict[str, list[ScannedFile]] = defaultdict(list)
    for f in files:
        by_class[f.label_name].append(f)
    kept, carved = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda f: (f.content_hash, f.path))
        order = np.random.default_rng(_stable_seed(seed, tag, label)).permutation(len(members))
        n_carved = min(int(round(len(members) * fraction)), len(members) - 1)
        carved += [members[i] for i in order[:n_carved]]
        kept += [members[i] for i in order[n_carved:]]
    return kept, carved


def plan(config: Config, scanned: list[ScannedFile]) -> Plan:
    result = Plan(scanned=len(scanned))
    accepted = []
    for f in scanned:
        if f.reason:
            result.rejected.append(Rejected(f.domain, f.path, f.given_split, f.reason))
        else:
            accepted.append(f)

    groups: dict[tuple[str, str], list[ScannedFile]] = defaultdict(list)
    for f in accepted:
        groups[(f.domain, f.content_hash)].append(f)
    unique = []
    for (domain, content_hash), members in sorted(groups.items()):
        members.sort(key=lambda f: (SPLIT_PRIORITY[f.given_split], f.path))
        unique.append(members[0])
        if len(members) > 1:
            labels = sorted({m.label_name for m in members})
            result.duplicates.append(DuplicateGroup(
                domain=domain, content_hash=content_hash, kept=members[0].path,
                dropped=[m.path for m in members[1:]], labels=labels, conflicting_labels=len(labels) > 1,
                splits=sorted({m.given_split for m in members})))

    data = config.data
    for domain in config.data.domains:
        mine = [f for f in unique if f.domain == domain.name]
        given = {s: [f for f in mine if f.given_split == s] for s in (*SPLITS, WHOLE_DATASET)}
        train = given["train"] + given[WHOLE_DATASET]
        val, test = given["val"], given["test"]
        if "test" not in domain.splits:
            train, test = _carve(train, data.test_fraction, data.split_seed, f"{domain.name}/test")
        if "val" not in domain.splits:
            # val is a fraction of the whole, carved from what is left for training
            share = data.val_fraction / (1 - data.test_fraction) if "test" not in domain.splits else data.val_fraction
            train, val = _carve(train, share, data.split_seed, f"{domain.name}/val")
        for split, files in (("train", train), ("val", val), ("test", test)):
            result.rows += [(f, split) for f in files]
    return result


# ---------------------------------------------------------------- write


def _row_order(rows: list[tuple[ScannedFile, str]], split: str, seed: int) -> list[ScannedFile]:
    """Train rows shuffled (seeded) so any window of a shard mixes classes; others by path."""
    files = sorted((f for f, s in rows if s == split), key=lambda f: (f.domain, f.path))
    if split == "train":
        order = np.random.default_rng(_stable_seed(seed, "shard-order")).permutation(len(files))
        files = [files[i] for i in order]
    return files


def _write_shard(store: Store, key: str, files: list[ScannedFile], config: Config, split: str,
                 sources: dict[str, tuple[pafs.FileSystem, str]]) -> int:
    """One Parquet shard; `sources` are the datasets' file systems, resolved once per prepare."""
    domains = {d.name: (i, d) for i, d in enumerate(config.data.domains)}
    images = []
    for f in files:
        fs, root = sources[f.domain]
        with fs.open_input_stream(posixpath.join(root, f.path)) as stream:
            data = stream.read()
        if hashlib.sha256(data).hexdigest() != f.content_hash:
            raise DataError(f"{f.domain}: {f.path} changed while preparing; run prepare again")
        images.append(data)
    table = pa.table({
        "image": images,
        "domain": [f.domain for f in files],
        "domain_index": [domains[f.domain][0] for f in files],
        "label": [domains[f.domain][1].classes.index(f.label_name) for f in files],
        "label_name": [f.label_name for f in files],
        "split": [split] * len(files),
        "source_path": [f.path for f in files],
        "content_hash": [f.content_hash for f in files],
        "width": [f.width for f in files],
        "height": [f.height for f in files],
    }, schema=SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=512)
    store.write_bytes(key, sink.getvalue())
    return len(files)


def dataset_id(config: Config, scanned: list[ScannedFile]) -> str:
    """Content-derived: same files, labels and data settings give the same id, wherever they live."""
    identity = {
        "schema_version": SCHEMA_VERSION,
        "data": config.identity()["data"],
        "files": sorted((f.domain, f.path, f.content_hash) for f in scanned),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"ds-{digest[:16]}"


def _counts(config: Config, rows: list[tuple[ScannedFile, str]]) -> dict:
    counts = Counter((f.domain, s, f.label_name) for f, s in rows)
    return {d.name: {s: {c: counts[(d.name, s, c)] for c in d.classes} for s in SPLITS}
            for d in config.data.domains}


def _sharpness(config: Config, rows: list[tuple[ScannedFile, str]]) -> dict[str, dict[str, Sharpness]]:
    """Per dataset and split: the spread of `sharpness` (10th, 50th, 90th percentile)."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for f, split in rows:
        values[(f.domain, split)].append(f.sharpness)
    return {d.name: {s: Sharpness(len(v), *(round(float(np.percentile(v, q)), 1) for q in (10, 50, 90)))
                     for s in SPLITS if (v := values[(d.name, s)])}
            for d in config.data.domains}


def sharpness_warnings(stats: dict[str, dict[str, Sharpness]]) -> list[str]:
    """One line per split whose median sharpness is SHARPNESS_SHIFT times or more off its train split's."""
    warnings = []
    for domain, splits in stats.items():
        if "train" not in splits:
            continue
        train = max(splits["train"].p50, 0.1)
        for split, other in splits.items():
            ratio = max(other.p50, 0.1) / train
            shift = max(ratio, 1 / ratio)
            if split != "train" and shift >= SHARPNESS_SHIFT:
                warnings.append(
                    f"{domain}: the train images are {shift:.0f}x "
                    f"{'blurrier' if ratio > 1 else 'sharper'} than the {split} images (median sharpness "
                    f"{splits['train'].p50} vs {other.p50}); the model learns a look it will not meet "
                    f"at {split} time. See README 'Sharpness shift' (model.inference_lowpass)")
    return warnings


def split_warnings(counts: dict) -> list[str]:
    """A dataset that trains but has an empty val or test split, or a class with training images
    and no validation image: model selection (or the test figure) would silently leave it out."""
    warnings = []
    for domain, splits in counts.items():
        n_train = sum(splits["train"].values())
        if not n_train:
            continue  # nothing to train on (a dataset prepared only to be scored): nothing to select
        for split in ("val", "test"):
            if not sum(splits[split].values()):
                warnings.append(f"{domain}: the {split} split is empty ({n_train} train images): add images "
                                f"or a {split} folder, or raise data.{split}_fraction")
        missing = [c for c, n in splits["val"].items() if n == 0 and splits["train"][c] > 0]
        if missing and sum(splits["val"].values()):
            warnings.append(f"{domain}: no validation image of class {', '.join(missing)} "
                            f"(training has {', '.join(str(splits['train'][c]) for c in missing)}): "
                            f"its F1 on validation is 0 whatever the model does")
    return warnings


def _warn(manifest: DatasetManifest) -> None:
    for warning in manifest.warnings:
        log.warning(warning)


def prepare(config: Config, store: Store) -> DatasetManifest:
    """Write the dataset to the store unless a complete one with the same id is already there."""
    require_roots(config)
    store.check_writable()
    scanned = scan(config)
    ds_id = dataset_id(config, scanned)
    prefix = dataset_key(ds_id)
    if store.exists(f"{prefix}/{MANIFEST_FILE}"):
        log.info("dataset %s is already complete at %s: nothing to do", ds_id, store.key_uri(prefix))
        manifest = read_manifest(store, ds_id)
        _warn(manifest)
        return dataclasses.replace(manifest, skipped=True)
    store.delete_prefix(f"{prefix}/{SHARDS_DIR}")  # leftovers of an interrupted run of this same id

    result = plan(config, scanned)
    if not result.rows:
        raise DataError("no usable images in any dataset; see the rejected files with --debug")
    shards: dict[str, list[Shard]] = {}
    rows_per_shard = config.data.shard_rows
    sources = {d.name: resolve(d.root) for d in config.data.domains}  # one S3 client, not one per shard
    with Progress("write shards", len(result.rows), "image") as bar:
        for split in SPLITS:
            files = _row_order(result.rows, split, config.data.split_seed)
            shards[split] = []
            for domain in config.domain_names():
                domain_files = [f for f in files if f.domain == domain]
                for start in range(0, len(domain_files), rows_per_shard):
                    chunk = domain_files[start:start + rows_per_shard]
                    shard = shard_file(split, domain, start // rows_per_shard)
                    _write_shard(store, f"{prefix}/{shard}", chunk, config, split, sources)
                    shards[split].append(Shard(shard, domain, len(chunk)))
                    bar.advance(len(chunk))

    n_duplicates = sum(len(d.dropped) for d in result.duplicates)
    sharpness_stats = _sharpness(config, result.rows)
    counts = _counts(config, result.rows)
    manifest = DatasetManifest(
        dataset_id=ds_id, schema_version=SCHEMA_VERSION, mdfer_version=mdfer.__version__,
        config=config.to_dict()["data"],
        domains={d.name: DomainClasses(d.classes) for d in config.data.domains},
        counts=counts,
        totals=Totals(scanned=result.scanned, accepted=len(result.rows), rejected=len(result.rejected),
                      duplicates=n_duplicates, duplicate_groups=len(result.duplicates),
                      conflicting_label_groups=sum(d.conflicting_labels for d in result.duplicates)),
        sharpness=sharpness_stats,
        warnings=sharpness_warnings(sharpness_stats) + split_warnings(counts),
        rejected=result.rejected, duplicates=result.duplicates, shards=shards)
    assert result.scanned == len(result.rows) + len(result.rejected) + n_duplicates
    store.write_json(f"{prefix}/{MANIFEST_FILE}", manifest.to_dict())  # last: seals the dataset
    _warn(manifest)
    return manifest

