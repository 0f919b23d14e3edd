"""Config validation: every bad value is an error naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mdfer.config import load_config, require_roots
from mdfer.errors import ConfigError

DEFAULT = Path(__file__).parents[1] / "mdfer" / "configs" / "default.yaml"


def write(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(DEFAULT.read_text())
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("edit, key, words", [
    (lambda c: c["train"].update(learning_rate=1), "train.learning_rate", "unknown key"),
    (lambda c: c["train"]["stages"][0].update(lr=0), "train.stages[0].lr", "must be > 0"),
    (lambda c: c["train"]["stages"][1].update(lr=-1e-4), "train.stages[1].lr", "must be > 0"),
    (lambda c: c["train"]["stages"][0].update(frozen_fraction=1.5), "train.stages[0].frozen_fraction", "outside [0, 1]"),
    (lambda c: c["model"].update(image_size=16), "model.image_size", "below 32"),
    (lambda c: c["model"].update(image_size="big"), "model.image_size", "expected int"),
    (lambda c: c["train"].update(workers=2.5), "train.workers", "expected int"),
    (lambda c: c["train"].update(seed=-1), "train.seed", "must be >= 0"),
    (lambda c: c["stream"].update(batch_size=31), "stream.batch_size", "divide evenly"),
    (lambda c: c["data"]["domains"][0].pop("classes"), "data.domains[0].classes", "required key is missing"),
    (lambda c: c["data"]["domains"][1]["folders"].update(shy="bashful"), "data.domains[1].folders.shy", "maps to 'bashful'"),
    (lambda c: c["data"]["domains"][0]["splits"].update(dev="dev"), "data.domains[0].splits.dev", "unknown split"),
    (lambda c: c["train"]["stages"][0]["loss_weights"].pop("fane"), "train.stages[0].loss_weights", "needs exactly the heads"),
    (lambda c: c["stream"]["domain_mix"].update(sfew=0.5), "stream.domain_mix.sfew", "no dataset named"),
    (lambda c: c["stream"]["augment"].update(max_rotation_deg=90), "stream.augment.max_rotation_deg", "within [0, 45]"),
    (lambda c: c["data"]["domains"][1].update(name="fer2013"), "data.domains", "names repeat"),
    (lambda c: c["data"]["domains"][1].update(name="pool"), "data.domains[1].name", "it names a model head"),
    (lambda c: c["stream"]["domain_mix"].update(fer2013=0.7), "stream.domain_mix", "missing: ['fane']"),
    (lambda c: c["train"].update(workers=32), "stream.batch_size", "cannot hold one sample"),
    (lambda c: c["train"]["stages"][2].update(lr_schedule="linear"), "train.stages[2].lr_schedule",
     "'linear' is not one of constant, cosine"),
    (lambda c: c["model"].update(inference_lowpass=4), "model.inference_lowpass", "neither 0 (off) nor an odd width"),
    (lambda c: c["model"].update(image_size=32, inference_lowpass=33), "model.inference_lowpass", "below model.image_size (32)"),
    (lambda c: c["train"]["stages"][0].update(lr=float("inf")), "train.stages[0].lr", "expected a finite number, got inf"),
    (lambda c: c["train"]["stages"][0].update(lr=float("nan")), "train.stages[0].lr", "expected a finite number, got nan"),
    (lambda c: c["train"]["stages"][0].update(lr="fast"), "train.stages[0].lr", "expected float, got str 'fast'"),
    (lambda c: c["train"]["stages"][1].update(name="../runs"), "train.stages[1].name", "names a folder in the store"),
    (lambda c: c["train"]["stages"][1].update(name="a/b"), "train.stages[1].name", "names a folder in the store"),
    (lambda c: c["train"]["stages"][1].update(name=".."), "train.stages[1].name", "names a folder in the store"),
    (lambda c: c["train"]["stages"][1].update(name="-x"), "train.stages[1].name", "starting with a letter or digit"),
    (lambda c: c["train"]["stages"][2].update(name="stage1"), "train.stages[0].name", "'stage1' names two stages"),
    (lambda c: c["train"].update(optimizer="rmsprop"), "train.optimizer", "'rmsprop' is not one of adam, adamw, sgd"),
    (lambda c: c["train"].update(weight_decay=0.05), "train.weight_decay", "use optimizer: adamw"),
    (lambda c: c["train"]["stages"][0].update(warmup_epochs=3), "train.stages[0].warmup_epochs", "outside [0, epochs=3)"),
    (lambda c: c["train"]["stages"][0].update(lr_end=1e-3), "train.stages[0].lr_end", "outside [0, lr=0.0005)"),
    (lambda c: c["stream"]["augment"].update(erase=1.5), "stream.augment.erase", "is a probability"),
    (lambda c: c["model"].update(drop_connect_rate=1.0), "model.drop_connect_rate", "1.0 is outside [0, 1)"),
    (lambda c: c["model"].update(stride1_blocks=[5]), "model.stride1_blocks", "only block groups that downsample"),
    (lambda c: c["train"]["stages"][1].update(stride1_blocks=[4, 4]), "train.stages[1].stride1_blocks",
     "names a block group twice"),
    (lambda c: c["train"]["stages"][1].update(stride1_blocks="4"), "train.stages[1].stride1_blocks", "expected"),
    (lambda c: c["train"].update(placement_strategy="spread"), "train.placement_strategy", "not one of PACK, SPREAD"),
])
def test_bad_values_name_file_and_key(tmp_path, edit, key, words):
    path = write(tmp_path, edit)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert words in message


def test_malformed_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_missing_or_absent_data_root_is_named(tmp_path):
    config = load_config()
    with pytest.raises(ConfigError, match=r"data\.domains\[0\]\.root \(fer2013\): missing"):
        require_roots(config)
    config = load_config(None, {"fer2013": str(tmp_path), "fane": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match=r"data\.domains\[1\]\.root \(fane\): .*absent is not a folder"):
        require_roots(config)
    with pytest.raises(ConfigError, match="no dataset named 'sfew'"):
        load_config(None, {"sfew": str(tmp_path)})


def test_default_config_is_the_seed(tmp_path):
    config = load_config()
    assert config.domain_names() == ["fer2013", "fane"]
    assert config.domain("fer2013").classes == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    assert len(config.domain("fane").classes) == 9
    assert [(s.lr, s.frozen_fraction) for s in config.train.stages] == [(5e-4, 0.5), (1e-4, 0.3), (5e-5, 0.0)]
    assert [s.loss_weights["domain"] for s in config.train.stages] == [0.1, 0.2, 0.1]


def test_third_dataset_by_config_alone_and_relative_roots(tmp_path):
    def add_sfew(c):
        c["data"]["domains"].append({
            "name": "sfew", "root": "sfew-data",
            "classes": ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
            "folders": {"Angry": "angry", "Disgust": "disgust", "Fear": "fear", "Happy": "happy",
                        "Sad": "sad", "Surprise": "surprise", "Neutral": "neutral"},
            "splits": {"train": "train"}})
        for stage in c["train"]["stages"]:
            stage["loss_weights"]["sfew"] = 1.0
    config = load_config(write(tmp_path, add_sfew))
    assert config.domain_names() == ["fer2013", "fane", "sfew"]
    assert config.domain("sfew").root == str(tmp_path / "sfew-data")


def test_identity_ignores_where_data_lives(tmp_path):
    a = load_config(None, {"fer2013": "/data/a", "fane": "s3://bucket/fane"})
    b = load_config(None, {"fer2013": str(tmp_path), "fane": str(tmp_path)})
    assert a.identity() == b.identity()
    b.train.stages[0].lr = 1e-3
    assert a.identity() != b.identity()


def test_options_added_later_change_the_identity_only_when_used():
    """So an upgrade does not move `mdfer pipeline`'s automatic run id for an unchanged config."""
    config = load_config(None, {"fer2013": "/a", "fane": "/b"})
    plain = config.identity()
    assert "inference_lowpass" not in plain["model"] and "lr_schedule" not in plain["train"]["stages"][0]
    assert plain["model"]["image_size"] == config.model.image_size  # the others stay
    config.model.inference_lowpass = 5
    config.train.stages[0].lr_schedule = "cosine"
    used = config.identity()
    assert used["model"]["inference_lowpass"] == 5 and used["train"]["stages"][0]["lr_schedule"] == "cosine"
    assert "lr_schedule" not in used["train"]["stages"][1]


@pytest.mark.parametrize("text, words", [
    ("train:\n  workers: 1\n  workers: 2\n", "key 'workers' given twice (first on line 2) (line 3, column 3)"),
    ("model: {image_size: 48, image_size: 64}\n", "key 'image_size' given twice"),
    ("data: [unclosed\n", "not valid YAML: expected ',' or ']'"),
])
def test_yaml_a_key_twice_is_refused_with_its_lines(tmp_path, text, words):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: not valid YAML: ") and words in str(error.value)


def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\xe9sum\xe9 of the run\ntrain: {}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 3: b'\\xe9'\); save it as UTF-8"):
        load_config(path)


def test_exponent_without_a_dot_is_the_number_meant(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; a user writing a float field means the number."""
    path = tmp_path / "lr.yaml"
    path.write_text(DEFAULT.read_text().replace("lr: 5.0e-4", "lr: 5e-4").replace("lr: 1.0e-4", "lr: +1E-4"))
    assert "lr: 5e-4" in path.read_text()
    stages = load_config(path).train.stages
    assert (stages[0].lr, stages[1].lr) == (5e-4, 1e-4) and isinstance(stages[0].lr, float)


def test_new_recipe_options_stay_out_of_the_identity_at_their_defaults():
    config = load_config(None, {"fer2013": "/a", "fane": "/b"})
    plain = config.identity()
    for key in ("optimizer", "weight_decay"):
        assert key not in plain["train"]
    assert "erase" not in plain["stream"]["augment"] and "flip" in plain["stream"]["augment"]
    assert not {"warmup_epochs", "lr_end", "stride1_blocks"} & set(plain["train"]["stages"][0])
    assert "stride1_blocks" not in plain["model"]
    config.train.optimizer, config.stream.augment.erase, config.train.stages[1].warmup_epochs = "sgd", 0.5, 1
    config.train.stages[2].stride1_blocks = [4]
    used = config.identity()
    assert used["train"]["stages"][2]["stride1_blocks"] == [4] and "stride1_blocks" not in used["train"]["stages"][1]
    assert used["train"]["optimizer"] == "sgd" and used["stream"]["augment"]["erase"] == 0.5
    assert used["train"]["stages"][1]["warmup_epochs"] == 1 and "warmup_epochs" not in used["train"]["stages"][0]


def _option_paths(cls: type, path: str = "") -> list[str]:
    import dataclasses
    import typing

    hints, found = typing.get_type_hints(cls), []
    for option in dataclasses.fields(cls):
        if option.name == "source":
            continue
        dotted = f"{path}.{option.name}" if path else option.name
        args = typing.get_args(hints[option.name])
        inner = args[0] if typing.get_origin(hints[option.name]) is list and args else hints[option.name]
        found += [dotted, *(_option_paths(inner, dotted) if dataclasses.is_dataclass(inner) else [])]
    return found


def test_every_later_option_stays_out_of_the_identity_at_its_default_with_no_list_to_update():
    """A new option needs no registration to keep run ids: whatever is not in the first
    release's list is dropped at its default, wherever it sits (a stage, a nested section)."""
    from mdfer.config import FIRST_RELEASE_OPTIONS, Config

    paths = _option_paths(Config)
    assert FIRST_RELEASE_OPTIONS <= set(paths), "a first-release option that no longer exists"
    later = [p for p in paths if p not in FIRST_RELEASE_OPTIONS]
    assert "train.stages.lr_end" in later and "model.stride1_blocks" in later
    config = load_config(None, {"fer2013": "/a", "fane": "/b"})
    identity = config.identity()
    for dotted in later:
        entries = [identity]
        for part in dotted.split(".")[:-1]:
            entries = [e for entry in entries for e in (entry[part] if isinstance(entry[part], list) else [entry[part]])]
        assert all(dotted.rsplit(".", 1)[-1] not in entry for entry in entries), dotted


def test_warmup_then_cosine_per_step_to_lr_end(tmp_path):
    """Linear warm-up, then a cosine from lr to lr_end that reaches lr_end at the stage's last step;
    a function of the position only, so a resumed stage continues the same curve."""
    from mdfer.train_loop import epoch_lr, scheduled_lr

    (stage, *_) = load_config(write(tmp_path, lambda c: c["train"]["stages"][0].update(
        lr_schedule="cosine", lr=1e-3, lr_end=1e-4, warmup_epochs=1, epochs=5))).train.stages
    steps = 10
    curve = [scheduled_lr(stage, epoch, step, steps) for epoch in range(1, 6) for step in range(steps)]
    warm, decay = curve[:steps], curve[steps:]
    assert warm == pytest.approx([1e-3 * (i + 1) / steps for i in range(steps)])  # never 0, reaches lr
    assert decay[0] == pytest.approx(1e-3) and decay == sorted(decay, reverse=True)
    assert scheduled_lr(stage, 5, steps, steps) == pytest.approx(1e-4)  # the end of the last epoch
    assert decay[-1] > 1e-4 and decay[len(decay) // 2] == pytest.approx((1e-3 + 1e-4) / 2)  # the middle
    assert epoch_lr(stage, 3, steps) == scheduled_lr(stage, 3, 0, steps)  # what an epoch line reports
    assert epoch_lr(stage, 1, steps) == pytest.approx(1e-4)  # a warm-up epoch reports its first step's LR


def test_relative_weights_path_starts_at_the_config(tmp_path):
    path = write(tmp_path, lambda c: c["model"].update(weights="w/init.weights.h5"))
    assert load_config(path).model.weights == str(tmp_path / "w" / "init.weights.h5")


def test_cosine_schedule_decays_over_the_epochs_and_constant_does_not(tmp_path):
    from mdfer.train_loop import epoch_lr

    stages = load_config(write(tmp_path, lambda c: c["train"]["stages"][0].update(
        lr_schedule="cosine", lr=1e-3, epochs=4))).train.stages
    cosine = [epoch_lr(stages[0], epoch) for epoch in range(1, 5)]
    assert cosine[0] == pytest.approx(1e-3)  # the first epoch runs at the configured LR
    assert cosine == sorted(cosine, reverse=True) and len(set(cosine)) == 4
    assert 0 < cosine[-1] < 0.2e-3  # the last epoch still learns, a little
    assert [epoch_lr(stages[1], epoch) for epoch in (1, 5)] == [stages[1].lr] * 2  # default: constant


@pytest.mark.parametrize("name", sorted(p.name for p in DEFAULT.parent.glob("*.yaml")))
def test_every_packaged_config_loads(name):
    config = load_config(DEFAULT.parent / name)
    assert config.train.stages and config.data.domains
    if name == "fer2013_sfew.yaml":  # the real run's config: the data roots come from the command line
        assert [d.name for d in config.data.domains] == ["fer2013", "sfew"]
        with pytest.raises(ConfigError, match=r"data.domains\[0\].root \(fer2013\): missing"):
            require_roots(config)


# --- `--set KEY=VALUE`: any option from the command line, checked as the file is ---------------


def test_set_gives_what_the_same_value_in_the_file_gives(tmp_path):
    sets = ["train.stages.0.epochs=3", "train.stages.1.lr=1e-3", "model.stride1_blocks=[4]",
            "stream.domain_mix={fer2013: 0.5, fane: 0.5}", "stream.augment.erase=0.25", "train.optimizer=adamw"]

    def edit(c):
        c["train"]["stages"][0]["epochs"] = 3
        c["train"]["stages"][1]["lr"] = 1e-3
        c["model"]["stride1_blocks"] = [4]
        c["stream"]["domain_mix"] = {"fer2013": 0.5, "fane": 0.5}
        c["stream"].setdefault("augment", {})["erase"] = 0.25
        c["train"]["optimizer"] = "adamw"
    in_file = load_config(write(tmp_path, edit))
    (tmp_path / "plain.yaml").write_text(DEFAULT.read_text())
    on_line = load_config(tmp_path / "plain.yaml", overrides=sets)
    assert on_line.to_dict() == in_file.to_dict()
    assert isinstance(on_line.train.stages[1].lr, float) and on_line.train.stages[0].epochs == 3
    assert on_line.source == f"{tmp_path / 'plain.yaml'} with --set " + ", ".join(s.split("=")[0] for s in sets)
    # on the embedded config too, and a relative root starts at the config file as the file's would
    assert load_config(None, overrides=["train.workers=1"]).train.workers == 1
    rooted = load_config(tmp_path / "plain.yaml", overrides=["data.domains.1.root=fane-data"])
    assert rooted.domain("fane").root == str(tmp_path / "fane-data")


@pytest.mark.parametrize("item, words", [
    ("train.stagse.0.epochs=3", "--set train.stagse.0.epochs: unknown key train.stagse (allowed: class_weighting"),
    ("source=x", "--set source: unknown key source (allowed:"),
    ("train.stages.3.epochs=3", "--set train.stages.3.epochs: train.stages has 3 item(s), no item 3"),
    ("train.stages.first.epochs=3", "--set train.stages.first.epochs: train.stages is a list: 'first' is not an item number"),
    ("train.workers.max=3", "--set train.workers.max: train.workers is a single value, with no key 'max'"),
    ("train.stages.0.epochs", "--set 'train.stages.0.epochs': expected KEY=VALUE"),
    ("train.stages.0.epochs=[3", "--set train.stages.0.epochs: not valid YAML: "),
])
def test_set_of_no_option_is_one_line_naming_it(item, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides=[item])
    assert str(error.value).startswith(words) and "\n" not in str(error.value), str(error.value)


@pytest.mark.parametrize("item, key, words", [
    ("train.stages.0.epochs=three", "train.stages[0].epochs", "expected int, got str 'three'"),
    ("train.stages.0.lr=0", "train.stages[0].lr", "must be > 0"),
    ("model.stride1_blocks=4", "model.stride1_blocks", "expected a list, got int"),
    ("stream.domain_mix={fer2013: 1}", "stream.domain_mix", "missing: ['fane']"),
    ("train.workers=3", "stream.batch_size", "does not divide evenly over 3 workers"),
])
def test_a_bad_value_from_set_is_the_file_s_own_error(item, key, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides=[item])
    source = f"<embedded default.yaml> with --set {item.split('=')[0]}"
    assert str(error.value).startswith(f"{source}: {key}: ") and words in str(error.value), str(error.value)


def test_set_twice_is_refused():
    with pytest.raises(ConfigError, match=r"^--set train.workers: given twice$"):
        load_config(None, overrides=["train.workers=1", "train.workers=2"])


def test_set_is_recorded_in_the_run_and_moves_the_pipeline_run_id(tmp_path):
    from mdfer.runs import derived_run_id, read_run_config, write_run_record
    from mdfer.storage import Store

    roots = {"fer2013": "/a", "fane": "/b"}
    plain = load_config(None, roots)
    changed = load_config(None, roots, overrides=["train.stages.0.epochs=1"])
    same = load_config(None, roots, overrides=[f"train.stages.0.epochs={plain.train.stages[0].epochs}"])
    later_at_default = load_config(None, roots, overrides=["train.optimizer=adam"])  # a later option, at its default
    assert derived_run_id(changed, "ds-1") != derived_run_id(plain, "ds-1")
    assert derived_run_id(same, "ds-1") == derived_run_id(later_at_default, "ds-1") == derived_run_id(plain, "ds-1")
    store = Store(str(tmp_path / "store"))
    write_run_record(store, "runs/r", changed, "r", "ds-1")
    recorded = read_run_config(store, "runs/r")
    assert recorded.train.stages[0].epochs == 1 and recorded.identity() == changed.identity()


def test_workers_option_is_a_set_of_train_workers():
    from mdfer.cli import _load, build_parser

    args = build_parser().parse_args(["train", "--dataset-id", "ds-1", "--run-id", "r", "--workers", "4"])
    assert _load(args).train.workers == 4
    args = build_parser().parse_args(["train", "--dataset-id", "ds-1", "--run-id", "r", "--workers", "3"])
    with pytest.raises(ConfigError, match=r"stream.batch_size: 32 does not divide evenly over 3 workers"):
        _load(args)  # checked as the file's own value is (it used to be set after validation)
    args = build_parser().parse_args(["prepare", "--set", "train.workers=1", "--set", "model.dropout=0.3"])
    assert (_load(args).train.workers, _load(args).model.dropout) == (1, 0.3)
