"""The one YAML configuration, loaded into dataclasses and validated before any work starts.

Every error names the file and the dotted key at fault, so a typo costs seconds, not a cluster
slot. Datasets ("domains") live here, not in code: a new dataset is a new list entry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mdfer import backbones
from mdfer.backbones import KERAS_DROP_CONNECT_RATE
from mdfer.errors import ConfigError

DEFAULT_CONFIG = "default.yaml"
DEMO_CONFIG = "demo.yaml"  # `mdfer pipeline` with no --config
GIVEN_SPLIT_NAMES = ("train", "val", "test")
WHOLE_DATASET = "all"  # a `splits` entry naming a folder with no split of its own
DOMAIN_HEAD = "domain"
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")  # sgd: momentum 0.9, Nesterov
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement groups
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # one folder in the store: no '/', no '..'
FOLDER_NAME_RULE = "letters, digits, '_', '-' and '.' (not '..'), starting with a letter or digit, at most 128"


def is_folder_name(text: str) -> bool:
    """Whether `text` can name one folder of the store (a stage, a run, a sweep, a dataset id)."""
    return bool(FOLDER_NAME.fullmatch(text)) and ".." not in text
# names of the model's own layers: a dataset (whose name is also its head's name) cannot take them
RESERVED_NAMES = ("image", "preprocess", "lowpass", "backbone", "pool", "head_dropout", DOMAIN_HEAD)


@dataclass
class DomainConfig:
    """One dataset: where it is, its classes, and how its folders map onto them."""

    name: str
    classes: list[str]
    folders: dict[str, str]  # folder name (case-insensitive) -> class; aliases welcome
    splits: dict[str, str]  # split name (train/val/test, or "all") -> folder under root
    root: str | None = None  # local folder or s3:// prefix


@dataclass
class DataConfig:
    domains: list[DomainConfig]
    val_fraction: float = 0.1  # carved out of train when no val split is given
    test_fraction: float = 0.15  # carved out of train when no test split is given
    split_seed: int = 1234
    min_image_side: int = 16  # smaller images are rejected as unusable
    max_image_pixels: int = 40_000_000  # larger ones are rejected from their header, never decoded
    shard_rows: int = 4096


@dataclass
class AugmentConfig:
    flip: bool = True
    max_shift: float = 0.08  # fraction of the image side
    max_rotation_deg: float = 10.0
    brightness: float = 0.2  # +- fraction of full scale
    contrast: float = 0.2  # +- fraction
    erase: float = 0.0  # probability of random erasing: one rectangle (2-25% of the image) set to noise


@dataclass
class StreamConfig:
    batch_size: int = 32  # global: summed over all workers
    domain_mix: dict[str, float] = field(default_factory=dict)  # empty: by dataset size
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    shuffle_buffer: int = 1024


# Every option of the first release, as a dotted path ("train.stages.lr": that key of each stage).
# An option added since counts in a config's identity (and so in `mdfer pipeline`'s automatic run
# id) only where it differs from its default: a config that does not use it keeps its run id across
# upgrades, and adding an option needs no entry anywhere (test_config checks this list is closed).
FIRST_RELEASE_OPTIONS = frozenset({
    "data", "data.domains", "data.domains.classes", "data.domains.folders", "data.domains.name",
    "data.domains.root", "data.domains.splits", "data.min_image_side", "data.shard_rows", "data.split_seed",
    "data.test_fraction", "data.val_fraction",
    "export", "export.calib_images", "export.parity_images", "export.representative_images",
    "model", "model.dropout", "model.image_size", "model.weights",
    "stream", "stream.augment", "stream.augment.brightness", "stream.augment.contrast", "stream.augment.flip",
    "stream.augment.max_rotation_deg", "stream.augment.max_shift", "stream.batch_size", "stream.domain_mix",
    "stream.shuffle_buffer",
    "train", "train.class_weighting", "train.cpus_per_worker", "train.gpus_per_worker", "train.label_smoothing",
    "train.max_failures", "train.mixed_precision", "train.seed", "train.stages", "train.stages.epochs",
    "train.stages.frozen_fraction", "train.stages.loss_weights", "train.stages.lr", "train.stages.name",
    "train.stages.patience", "train.workers",
})


@dataclass
class ModelConfig:
    backbone: str = backbones.DEFAULT_BACKBONE  # a name in mdfer.backbones.BACKBONES
    image_size: int = 64
    weights: str = "none"  # none | imagenet (where the backbone has it) | path or s3:// URI of a weights file
    dropout: float = 0.2
    inference_lowpass: int = 0  # 0 = off; odd w: evaluation and exports blur every input (3 passes of a w x w mean)
    # backbone block groups (efficientnetv2b0 only: of its stride1_groups) whose first block runs at stride 1: larger feature
    # maps from there on, the same weights; e.g. [4] at 48 px gives 6x6 maps in blocks 4-5, 3x3 in 6
    stride1_blocks: list[int] = field(default_factory=list)
    # stochastic depth: the share of samples whose residual branch is dropped, rising linearly over
    # the blocks to this value; 0 turns it off
    drop_connect_rate: float = KERAS_DROP_CONNECT_RATE


@dataclass
class StageConfig:
    name: str
    lr: float
    loss_weights: dict[str, float]  # one per dataset, plus "domain"
    frozen_fraction: float
    epochs: int
    patience: int = 3
    lr_schedule: str = "constant"  # constant | cosine (per step, from lr to lr_end at the stage's end)
    warmup_epochs: int = 0  # linear warm-up from ~0 to lr over this many epochs, then the schedule
    lr_end: float = 0.0  # where the cosine ends: chain stages into one long curve with it
    stride1_blocks: list[int] | None = None  # this stage's model.stride1_blocks (None: the model's)


@dataclass
class TrainConfig:
    stages: list[StageConfig]
    workers: int = 2
    cpus_per_worker: float = 0.5  # Ray's logical CPUs; leave some for the data stream
    gpus_per_worker: float = 0.0
    mixed_precision: bool = False
    label_smoothing: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd (momentum 0.9, Nesterov)
    weight_decay: float = 0.0  # decoupled (Keras `weight_decay`); adamw and sgd only
    class_weighting: bool = False
    max_failures: int = 2
    # how Ray places the workers: PACK fills a node first; SPREAD puts them on different nodes
    # when it can (a lost node then takes fewer workers with it), and packs when it cannot
    placement_strategy: str = "PACK"
    seed: int = 0


@dataclass
class ExportConfig:
    calib_images: int = 1024  # Hailo calibration set (calib.npy), drawn from the train split
    representative_images: int = 256  # int8 TFLite calibration, drawn from the train split
    parity_images: int = 500  # test images every format is checked on (0: the whole split)


@dataclass
class Config:
    data: DataConfig
    train: TrainConfig
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    source: str = "<embedded default>"  # the file it came from, for error messages

    def domain_names(self) -> list[str]:
        return [d.name for d in self.data.domains]

    def domain(self, name: str) -> DomainConfig:
        return next(d for d in self.data.domains if d.name == name)

    def stride1_blocks(self, stage_index: int = -1) -> list[int]:
        """The backbone's stride-1 block groups in a stage (default: the last, which evaluation
        and export use): weights carry over between stages whatever their strides."""
        stage = self.train.stages[stage_index]
        return self.model.stride1_blocks if stage.stride1_blocks is None else stage.stride1_blocks

    def classes(self) -> dict[str, list[str]]:
        """Each dataset's class list, in the config's dataset order (the model's head order)."""
        return {d.name: d.classes for d in self.data.domains}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def identity(self) -> dict[str, Any]:
        """What defines a dataset or run: everything but where the data happens to live, so
        the same data read from a local copy or from s3:// is the same dataset and run."""
        out = self.to_dict()
        out.pop("export")  # how a trained model is exported does not change the training
        for domain in out["data"]["domains"]:
            domain.pop("root")
        _drop_later_options_at_default(out, Config)
        return out


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds (itself, or the items of a list), if any."""
    args = typing.get_args(hint)
    inner = args[0] if typing.get_origin(hint) is list and args else hint
    return inner if dataclasses.is_dataclass(inner) else None


def _drop_later_options_at_default(values: dict[str, Any], cls: type, path: str = "") -> None:
    """Remove, in place, every option not in FIRST_RELEASE_OPTIONS whose value is its default."""
    hints = typing.get_type_hints(cls)
    for option in dataclasses.fields(cls):
        if option.name not in values:
            continue
        dotted = f"{path}.{option.name}" if path else option.name
        if dotted not in FIRST_RELEASE_OPTIONS and option_default(option) == values[option.name]:
            del values[option.name]
            continue
        nested = _dataclass_in(hints[option.name])
        if nested is not None:
            items = values[option.name] if isinstance(values[option.name], list) else [values[option.name]]
            for item in items:
                _drop_later_options_at_default(item, nested, dotted)


def option_default(option: dataclasses.Field) -> Any:
    """A field's default as `to_dict` writes it (a dataclass default as its dict); a required
    field has none (a sentinel that equals nothing)."""
    if option.default is not dataclasses.MISSING:
        value = option.default
    elif option.default_factory is not dataclasses.MISSING:
        value = option.default_factory()
    else:
        return dataclasses.MISSING
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# ---------------------------------------------------------------- loading


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong and where."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one,
    silently: a user who wrote `lr` twice gets the value they did not look at)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged, not a key
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first on line {seen[key]})", key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error says it best
                continue
        return super().construct_mapping(node, deep)


def read_yaml(data: bytes | str, source: str) -> Any:
    """YAML text (or bytes, which must be UTF-8) -> Python data, every problem one line naming
    `source`: not UTF-8 (with the byte offset), not YAML (with line and column), a key twice."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                              f"save it as UTF-8") from None
    try:
        return yaml.load(data, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {yaml_problem(exc)}") from None


def load_config(path: str | Path | None = None, data_roots: dict[str, str] | None = None,
                embedded: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> Config:
    """Load and validate a config file (None: the `embedded` one); `overrides`: `--set KEY=VALUE`
    items (see `apply_overrides`); `data_roots` overrides roots."""
    if path is None:
        data = resources.files("mdfer.configs").joinpath(embedded).read_bytes()
        source = f"<embedded {embedded}>"
        base_dir = None
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        data, source, base_dir = path.read_bytes(), str(path), path.parent
    raw = read_yaml(data, source)
    if overrides:
        raw = apply_overrides(raw, overrides)
        source = f"{source} with --set {', '.join(item.partition('=')[0] for item in overrides)}"
    config = config_from_dict(raw, source)
    for name, root in (data_roots or {}).items():
        if name not in config.domain_names():
            raise ConfigError(f"--data-root {name}=...: no dataset named {name!r} in {source} "
                              f"(datasets: {', '.join(config.domain_names())})")
        config.domain(name).root = root
    if base_dir is not None:  # relative paths start at the config file, wherever it is run from
        for domain in config.data.domains:
            if domain.root and "://" not in domain.root:
                domain.root = str((base_dir / domain.root).resolve())
        weights = config.model.weights
        if weights.lower() not in ("none", "imagenet") and "://" not in weights:
            config.model.weights = str((base_dir / weights).resolve())
    return config


def apply_overrides(raw: Any, overrides: list[str]) -> Any:
    """`--set KEY=VALUE` items applied in order to a config file's YAML data, before it is typed
    and validated, so a value from the command line is checked exactly as the file's would be
    (and a run records it in its config.yaml). KEY is a dotted path of the config's options, list
    items by number (`train.stages.0.epochs`); VALUE is YAML (`3`, `cosine`, `[4]`,
    `{fer2013: 0.5, fane: 0.5}`). A KEY that names no option is an error naming it."""
    keys: set[str] = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. train.stages.0.epochs=3)")
        if key in keys:
            raise ConfigError(f"--set {key}: given twice")
        keys.add(key)
        _set_option(raw, key, read_yaml(text, f"--set {key}"))
    return raw


def _set_option(raw: Any, key: str, value: Any) -> None:
    """Put `value` at the dotted `key` of `raw`, walking the Config schema beside the data: a
    missing mapping on the way is created (the option's default gets a value); where the file
    holds something of the wrong kind, nothing is set and validation names the file's mistake."""
    parts = key.split(".")
    node, kind = raw, Config
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        kind = _without_none(kind)
        origin = typing.get_origin(kind)
        if dataclasses.is_dataclass(kind):
            names = sorted(f.name for f in dataclasses.fields(kind) if f.name != "source")
            if part not in names:
                raise ConfigError(f"--set {key}: unknown key {_join(where, part)} (allowed: {', '.join(names)})")
            slot, child = part, _hints(kind)[part]
        elif origin is dict:
            slot, child = part, typing.get_args(kind)[1]
        elif origin is list:
            if not part.isdigit():
                raise ConfigError(f"--set {key}: {where} is a list: {part!r} is not an item number")
            slot, child = int(part), typing.get_args(kind)[0]
            if isinstance(node, list) and slot >= len(node):
                raise ConfigError(f"--set {key}: {where} has {len(node)} item(s), no item {slot}")
        else:
            raise ConfigError(f"--set {key}: {where} is a single value, with no key {part!r}")
        if not isinstance(node, list if origin is list else dict):
            return  # the file holds the wrong kind here: config_from_dict says so, naming the file
        if depth == len(parts) - 1:
            node[slot] = value
            return
        if isinstance(node, dict) and node.get(slot) is None:
            node[slot] = [] if typing.get_origin(_without_none(child)) is list else {}
        node, kind = node[slot], child


@functools.cache
def _hints(kind: type) -> dict[str, Any]:
    """A dataclass's field types (resolved once: a dataset manifest holds thousands of entries)."""
    return typing.get_type_hints(kind)


def _without_none(kind: Any) -> Any:
    """`X | None` -> X; anything else as it is."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return next(o for o in typing.get_args(kind) if o is not type(None))
    return kind


def config_from_dict(raw: Any, source: str) -> Config:
    config = build_typed(Config, raw, "", source)
    config.source = source
    validate(config)
    return config


def build_typed(kind: Any, value: Any, key: str, source: str) -> Any:
    """Turn YAML (or JSON) data into `kind`, rejecting unknown keys and wrong types by dotted key
    (`Any`: taken as it is)."""
    where = key or "<top level>"
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {_kind(value)}")
        hints = _hints(kind)
        known = {f.name for f in dataclasses.fields(kind) if f.name != "source"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{source}: {_join(key, unknown[0])}: unknown key "
                              f"(allowed: {', '.join(sorted(known))})")
        args = {}
        for f in dataclasses.fields(kind):
            if f.name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"{source}: {_join(key, f.name)}: required key is missing")
                continue
            args[f.name] = build_typed(hints[f.name], value[f.name], _join(key, f.name), source)
        return kind(**args)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(kind):
            return None
        return build_typed(_without_none(kind), value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {where}: expected a list, got {_kind(value)}")
        (item,) = typing.get_args(kind)
        return [build_typed(item, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where}: expected a mapping, got {_kind(value)}")
        key_kind, item = typing.get_args(kind)
        return {build_typed(key_kind, k, f"{where} key", source): build_typed(item, v, _join(key, str(k)), source)
                for k, v in value.items()}
    if kind is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string; the user means the number
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and type(value) is float and not math.isfinite(value):
        raise ConfigError(f"{source}: {where}: expected a finite number, got {value!r}")
    if kind in (int, float, str, bool) and (type(value) is kind):
        return value
    raise ConfigError(f"{source}: {where}: expected {kind.__name__}, got {_kind(value)} {value!r}")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# ---------------------------------------------------------------- validation


def validate(config: Config) -> None:
    """Range and consistency checks that types alone cannot express."""
    src = config.source

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{src}: {key}: {message}")

    data = config.data
    need(len(data.domains) >= 1, "data.domains", "at least one dataset is needed")
    names = [d.name for d in data.domains]
    need(len(set(names)) == len(names), "data.domains", f"dataset names repeat: {names}")
    for i, d in enumerate(data.domains):
        key = f"data.domains[{i}]"
        need(d.name.isidentifier() and d.name not in RESERVED_NAMES, f"{key}.name",
             f"{d.name!r} must be an identifier and none of {', '.join(RESERVED_NAMES)} "
             f"(it names a model head)")
        need(len(d.classes) >= 2, f"{key}.classes", "at least two classes are needed")
        need(len(set(d.classes)) == len(d.classes), f"{key}.classes", "class names repeat")
        lowered = [f.lower() for f in d.folders]
        need(len(set(lowered)) == len(lowered), f"{key}.folders",
             "folder names repeat when compared case-insensitively")
        for folder, cls in d.folders.items():
            need(cls in d.classes, f"{key}.folders.{folder}", f"maps to {cls!r}, not one of {d.classes}")
        need(bool(d.splits), f"{key}.splits", "name at least one folder (train/val/test or all)")
        for split in d.splits:
            need(split in (*GIVEN_SPLIT_NAMES, WHOLE_DATASET), f"{key}.splits.{split}",
                 f"unknown split; use {', '.join(GIVEN_SPLIT_NAMES)} or {WHOLE_DATASET}")
        if WHOLE_DATASET in d.splits:
            need(len(d.splits) == 1, f"{key}.splits", f"{WHOLE_DATASET!r} cannot be combined with other splits")
        elif d.splits:
            need("train" in d.splits, f"{key}.splits", "a train folder is needed")
    need(0 < data.val_fraction < 0.5, "data.val_fraction", f"{data.val_fraction} is outside (0, 0.5)")
    need(0 < data.test_fraction < 0.5, "data.test_fraction", f"{data.test_fraction} is outside (0, 0.5)")
    need(data.min_image_side >= 1, "data.min_image_side", "must be >= 1")
    need(data.max_image_pixels >= data.min_image_side ** 2, "data.max_image_pixels",
         f"must be >= data.min_image_side squared ({data.min_image_side ** 2})")
    for name in ("calib_images", "representative_images"):
        need(getattr(config.export, name) >= 1, f"export.{name}", "must be >= 1")
    need(config.export.parity_images >= 0, "export.parity_images", "must be >= 0 (0: the whole test split)")
    need(data.shard_rows >= 16, "data.shard_rows", "must be >= 16")

    model = config.model
    need(model.image_size >= 32, "model.image_size", f"{model.image_size} is below 32")
    need(0 <= model.dropout < 1, "model.dropout", f"{model.dropout} is outside [0, 1)")
    need(0 <= model.drop_connect_rate < 1, "model.drop_connect_rate", f"{model.drop_connect_rate} is outside [0, 1)")
    need(model.inference_lowpass == 0 or (model.inference_lowpass % 2 == 1 and 3 <= model.inference_lowpass < model.image_size),
         "model.inference_lowpass", f"{model.inference_lowpass} is neither 0 (off) nor an odd width from 3 to below "
         f"model.image_size ({model.image_size})")
    need(model.backbone in backbones.BACKBONES, "model.backbone",
         f"{model.backbone!r} is not one of {', '.join(sorted(backbones.BACKBONES))}")
    backbone = backbones.BACKBONES.get(model.backbone, backbones.V2B0)
    named = sorted(backbone.named_weights)
    need(bool(model.weights) and (model.weights.lower() not in ("imagenet",) or model.weights.lower() in named),
         "model.weights", f"{model.weights!r}: use none, {' / '.join(named) + ', ' if named else ''}"
         f"or a path / s3:// URI of a weights file")
    _check_stride1(need, "model.stride1_blocks", model.stride1_blocks, backbone)

    stream = config.stream
    need(stream.batch_size >= 2, "stream.batch_size", "must be >= 2")
    for name, share in stream.domain_mix.items():
        need(name in names, f"stream.domain_mix.{name}", f"no dataset named {name!r}")
        need(0 < share <= 1, f"stream.domain_mix.{name}", f"{share} is outside (0, 1]")
    if stream.domain_mix:
        missing = [n for n in names if n not in stream.domain_mix]
        need(not missing, "stream.domain_mix", f"give every dataset a share or none; missing: {missing}")
    aug = stream.augment
    need(0 <= aug.max_shift < 0.5, "stream.augment.max_shift", f"{aug.max_shift} is outside [0, 0.5)")
    need(0 <= aug.max_rotation_deg <= 45, "stream.augment.max_rotation_deg", "must be within [0, 45]")
    need(0 <= aug.brightness < 1, "stream.augment.brightness", "must be within [0, 1)")
    need(0 <= aug.contrast < 1, "stream.augment.contrast", "must be within [0, 1)")
    need(0 <= aug.erase <= 1, "stream.augment.erase", "is a probability: within [0, 1]")

    train = config.train
    need(train.workers >= 1, "train.workers", "must be >= 1")
    need(train.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
    need(train.gpus_per_worker >= 0, "train.gpus_per_worker", "must be >= 0")
    need(0 <= train.label_smoothing < 1, "train.label_smoothing", "must be within [0, 1)")
    need(train.max_failures >= 0, "train.max_failures", "must be >= 0")
    need(train.seed >= 0, "train.seed", "must be >= 0")
    need(train.placement_strategy in PLACEMENT_STRATEGIES, "train.placement_strategy",
         f"{train.placement_strategy!r} is not one of {', '.join(PLACEMENT_STRATEGIES)}")
    need(train.optimizer in OPTIMIZERS, "train.optimizer", f"{train.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    need(0 <= train.weight_decay < 1, "train.weight_decay", f"{train.weight_decay} is outside [0, 1)")
    need(train.weight_decay == 0 or train.optimizer != "adam", "train.weight_decay",
         "Keras's adam has no decoupled weight decay: use optimizer: adamw (or sgd)")
    need(stream.batch_size % train.workers == 0, "stream.batch_size",
         f"{stream.batch_size} does not divide evenly over {train.workers} workers")
    need(stream.batch_size // max(train.workers, 1) >= len(names), "stream.batch_size",
         f"a worker's batch of {stream.batch_size // max(train.workers, 1)} cannot hold one sample "
         f"of each of the {len(names)} datasets")
    need(len(train.stages) >= 1, "train.stages", "at least one stage is needed")
    heads = {*names, DOMAIN_HEAD}
    stage_names = [stage.name for stage in train.stages]
    for i, stage in enumerate(train.stages):
        key = f"train.stages[{i}]"
        need(is_folder_name(stage.name), f"{key}.name", f"{stage.name!r}: it names a folder in the store; use "
             f"{FOLDER_NAME_RULE}")
        need(stage_names.count(stage.name) == 1, f"{key}.name", f"{stage.name!r} names two stages")
        need(stage.lr > 0, f"{key}.lr", f"{stage.lr} must be > 0")
        need(0 <= stage.frozen_fraction <= 1, f"{key}.frozen_fraction",
             f"{stage.frozen_fraction} is outside [0, 1]")
        need(stage.epochs >= 1, f"{key}.epochs", "must be >= 1")
        need(stage.patience >= 1, f"{key}.patience", "must be >= 1")
        need(0 <= stage.warmup_epochs < stage.epochs, f"{key}.warmup_epochs",
             f"{stage.warmup_epochs} is outside [0, epochs={stage.epochs})")
        need(0 <= stage.lr_end < stage.lr, f"{key}.lr_end", f"{stage.lr_end} is outside [0, lr={stage.lr:g})")
        need(stage.lr_schedule in LR_SCHEDULES, f"{key}.lr_schedule",
             f"{stage.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        need(set(stage.loss_weights) == heads, f"{key}.loss_weights",
             f"needs exactly the heads {sorted(heads)}, got {sorted(stage.loss_weights)}")
        for head, weight in stage.loss_weights.items():
            need(weight >= 0, f"{key}.loss_weights.{head}", f"{weight} must be >= 0")
        if stage.stride1_blocks is not None:
            _check_stride1(need, f"{key}.stride1_blocks", stage.stride1_blocks, backbone)


def _check_stride1(need, key: str, blocks: list[int], backbone: backbones.Backbone) -> None:
    if blocks and not backbone.stride1_groups:
        need(False, key, f"{blocks}: {backbone.name} has no stride-1 option (leave it out)")
        return
    need(all(b in backbone.stride1_groups for b in blocks), key,
         f"{blocks}: only block groups that downsample can run at stride 1: {list(backbone.stride1_groups)}")
    need(len(set(blocks)) == len(blocks), key, f"{blocks} names a block group twice")



def require_roots(config: Config) -> None:
    """Data roots are only needed by `prepare`; check them there, by dataset name."""
    for i, d in enumerate(config.data.domains):
        if not d.root:
            raise ConfigError(f"{config.source}: data.domains[{i}].root ({d.name}): missing; set it "
                              f"in the config or pass --data-root {d.name}=PATH")
        if "://" not in d.root and not Path(d.root).is_dir():
            raise ConfigError(f"{config.source}: data.domains[{i}].root ({d.name}): "
                              f"{d.root} is not a folder")


def parse_name_paths(pairs: list[str], option: str = "--data-root") -> dict[str, str]:
    """`NAME=PATH` pairs from the command line (`option` names them in errors), each name once."""
    paths: dict[str, str] = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{option} {pair!r}: expected NAME=PATH")
        if name in paths:
            raise ConfigError(f"{option} {name}=...: given twice")
        paths[name] = path
    return paths
