"""Credentials never reach a message: the redactor and the store's errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mdfer.logs import redact
from mdfer.storage import storage_error


def test_redacts_secret_env_values_and_key_value_pairs(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    text = "failed with s3cr3t-value-xyz for AKIAEXAMPLEKEY; password=hunter22 token: abc123"
    cleaned = redact(text)
    for secret in ("s3cr3t-value-xyz", "AKIAEXAMPLEKEY", "hunter22", "abc123"):
        assert secret not in cleaned
    assert cleaned.startswith("failed with ***")


def test_storage_errors_are_one_redacted_line(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    error = storage_error("s3://bucket/key", OSError("denied for s3cr3t-value-xyz\nsecond line"))
    assert str(error) == "s3://bucket/key: denied for *** second line"  # the whole cause, on one line


# --- what reaches the console -------------------------------------------------------------

import logging  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from mdfer import logs  # noqa: E402


def _logged_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mdfer"]


def test_progress_off_a_terminal_is_a_line_per_quarter_after_a_few_seconds(monkeypatch, caplog):
    monkeypatch.setattr(logs, "on_terminal", lambda: False)
    monkeypatch.setenv(logs.VERBOSITY_ENV, logs.NORMAL)
    caplog.set_level(logging.INFO, logger="mdfer")
    quick = logs.Progress("scan", 100, "file")
    for _ in range(100):
        quick.advance()
    assert _logged_lines(caplog) == []  # a loop shorter than QUIET_SECONDS says nothing
    monkeypatch.setattr(logs.Progress, "QUIET_SECONDS", 0.0)
    with logs.Progress("stage1 epoch 2/5", 400, "img") as bar:
        for done in range(0, 401, 10):
            bar.update(done, rate=120.0, left=(400 - done) / 120)
    lines = _logged_lines(caplog)
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == ["25", "50", "75"]
    assert lines[0] == "stage1 epoch 2/5: 25% (100/400), 120 img/s, 0:02 left"


def test_progress_on_a_terminal_is_one_live_line_and_nothing_when_quiet(monkeypatch, capsys, caplog):
    monkeypatch.setattr(logs, "on_terminal", lambda: True)
    monkeypatch.setenv(logs.VERBOSITY_ENV, logs.NORMAL)
    with logs.Progress("write shards", 10, "image") as bar:
        bar.advance(5)
    err = capsys.readouterr().err
    assert "\r\x1b[K" in err and "write shards [" in err and "5/10" in err and "\n" not in err
    monkeypatch.setenv(logs.VERBOSITY_ENV, logs.QUIET)
    monkeypatch.setattr(logs.Progress, "QUIET_SECONDS", 0.0)
    with logs.Progress("write shards", 10, "image") as bar:
        bar.advance(10)
    assert capsys.readouterr().err == "" and _logged_lines(caplog) == []


CONSOLE_PROBE = """
import logging, os, sys
from mdfer.logs import setup_logging
log_file = setup_logging(sys.argv[1], command="probe")
logging.getLogger("ray.data").info("ray data chatter")
logging.getLogger("ray").warning("ray warning")
logging.getLogger("ray").error("ray error")
logging.getLogger("mdfer.stages").info("stage1: training")
logging.getLogger("mdfer").warning("the store is nearly full")
os.write(2, b"I0000 00:00:1.0 port.cc:153] native start-up line\\n")
print("table row")
print("LOGFILE", log_file)
"""


@pytest.mark.parametrize("level", ["normal", "quiet", "verbose"])
def test_console_shows_mdfer_lines_and_errors_the_log_file_the_rest(tmp_path, level):
    done = subprocess.run([sys.executable, "-c", CONSOLE_PROBE, level], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, logs.LOG_DIR_ENV: str(tmp_path / "logs")}, timeout=60)
    assert done.returncode == 0, done.stderr
    console = done.stderr.splitlines()
    shown = {text: any(text in line for line in console)
             for text in ("ray data chatter", "ray warning", "ray error", "stage1: training",
                          "the store is nearly full", "native start-up line")}
    expected = {"normal": {"ray error", "stage1: training", "the store is nearly full"},
                "quiet": {"ray error", "the store is nearly full"},
                "verbose": set(shown)}[level]
    assert {text for text, seen in shown.items() if seen} == expected
    assert "table row" in done.stdout  # tables are printed whatever the level
    assert all(re.match(r"^\d\d:\d\d:\d\d ", line) for line in console if "native" not in line)
    assert any(line.endswith(" warning: the store is nearly full") for line in console)
    log_file = done.stdout.split("LOGFILE ")[1].strip()
    if level == "verbose":
        assert log_file == "None"  # everything is on the console
    else:
        written = Path(log_file).read_text()
        for text in ("ray data chatter", "ray warning", "ray error", "stage1: training", "native start-up line"):
            assert text in written
