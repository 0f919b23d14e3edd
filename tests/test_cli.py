"""The `mdfer` command: subcommands, one-line errors with a non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import MDFER


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*MDFER, *args], capture_output=True, text=True, timeout=120, **kwargs)


def test_help_lists_every_step():
    result = run("--help")
    assert result.returncode == 0
    for command in ("synth", "prepare", "train", "evaluate", "pipeline"):
        assert command in result.stdout


@pytest.mark.parametrize("args, message", [
    (["prepare", "--config", "/nope/missing.yaml"], "/nope/missing.yaml: config file not found"),
    (["prepare", "--data-root", "fer2013=/nope/fer", "--data-root", "fane=/nope/fane"],
     "data.domains[0].root (fer2013): /nope/fer is not a folder"),
    (["prepare"], "data.domains[0].root (fer2013): missing"),
    (["prepare", "--data-root", "fer2013"], "--data-root 'fer2013': expected NAME=PATH"),
    (["evaluate", "--run-id", "nothing-here", "--store", "{tmp}"], "no finished run with this id"),
    (["train", "--dataset-id", "ds-0000", "--run-id", "x", "--store", "{tmp}"], "no complete dataset 'ds-0000'"),
    (["prepare", "--config", "{tmp}/broken.yaml"], "broken.yaml: not valid YAML"),
    (["pipeline", "--config", "{tmp}/broken.yaml"], "broken.yaml: not valid YAML"),
    (["train", "--config", "{tmp}/unknown.yaml", "--dataset-id", "ds-0", "--run-id", "x"], "unknown.yaml: trian: unknown key"),
    (["prepare", "--data-root", "fer2013={tmp}/empty", "--data-root", "fane={tmp}/empty"], "fer2013: no files under"),
    (["export", "--run-id", "nothing-here", "--store", "{tmp}"], "no finished run or sweep there"),
    (["pipeline", "--store", "ftp://host/x"], "ftp://host/x: unsupported location"),
    (["prepare", "--set", "trian.workers=1"], "--set trian.workers: unknown key trian (allowed: data, export"),
    (["train", "--set", "train.stages.0.lr=0", "--dataset-id", "ds-0", "--run-id", "x"],
     "<embedded default.yaml> with --set train.stages.0.lr: train.stages[0].lr: 0.0 must be > 0"),
    (["evaluate", "--run-id", "x", "--set", "model.dropout=0.1"], "--set changes the --config file's options"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, message):
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    (tmp_path / "unknown.yaml").write_text("trian: {}\n")
    for folder in ("train", "test", "fane_data"):
        (tmp_path / "empty" / folder).mkdir(parents=True)
    result = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"mdfer {args[0]}: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = run("--debug", "prepare", "--config", "/nope/missing.yaml")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_synth_writes_both_layouts(tmp_path):
    result = run("synth", "--out", str(tmp_path), "--per-class", "4")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "fer2013" / "train" / "happy").glob("*.jpg"))) == 4
    assert len(list((tmp_path / "fer2013" / "test" / "happy").glob("*.jpg"))) == 2
    assert len(list((tmp_path / "fane" / "fane_data").glob("*/*.jpg"))) == 9 * 5


def test_cli_conventions_version_debug_anywhere_defaults_in_help():
    import mdfer
    assert run("--version").stdout.strip() == f"mdfer {mdfer.__version__}"
    after = run("prepare", "--config", "/nope/missing.yaml", "--debug")  # --debug after the command
    assert after.returncode != 0 and "Traceback" in after.stderr
    wide = {**os.environ, "COLUMNS": "300"}  # no line breaks inside a help text
    helped = run("evaluate", "--help", env=wide).stdout
    assert "(default: test)" in helped and "(default: mdfer-home/store)" in helped
    assert "--debug" in helped and "(default: None)" not in helped and "(default: False)" not in helped
    assert "embedded demo.yaml" in run("pipeline", "--help", env=wide).stdout  # the config it really uses
    assert "embedded default.yaml" in run("prepare", "--help", env=wide).stdout


@pytest.mark.parametrize("args, message", [
    (["synth", "--per-class", "-3"], "mdfer synth: error: argument --per-class: -3 is not a positive whole number"),
    (["train", "--run-id", "x"], "mdfer train: error: the following arguments are required: --dataset-id"),
    (["nosuch"], "mdfer: error: argument COMMAND: invalid choice: 'nosuch'"),
    (["evaluate", "--run-id", "../outside"], "mdfer evaluate: error: --run-id '../outside': use letters"),
    (["export", "--sweep-id", "a/b"], "mdfer export: error: --sweep-id 'a/b': use letters"),
])
def test_usage_mistakes_are_one_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
