"""Credentials never reach a message: the redactor and the store's errors."""

from __future__ import annotations

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
