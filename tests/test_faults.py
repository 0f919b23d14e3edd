"""The store under an S3 outage: a brief one is ridden out, a long one is a clear error."""

from __future__ import annotations

import threading
import time

import pytest

from mdfer import storage
from mdfer.errors import MdferError
from mdfer.storage import Store


@pytest.fixture
def outage_store(fresh_s3_server, monkeypatch) -> Store:
    for name, value in fresh_s3_server.env().items():
        monkeypatch.setenv(name, value)
    store = Store(f"s3://{fresh_s3_server.bucket}/outage")
    store.write_json("before.json", {"written": "before"})
    return store


def test_brief_outage_is_ridden_out(outage_store, fresh_s3_server):
    fresh_s3_server.stop()
    outcome: dict = {}

    def work() -> None:  # the server is down when this starts
        try:
            outage_store.write_json("during.json", {"written": "during"})
            outcome["read"] = outage_store.read_json("before.json")
        except Exception as exc:
            outcome["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(8.0)  # longer than the S3 client's own quick retries
    fresh_s3_server.start()  # from this thread: the server dies with the thread that started it
    worker.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["read"] == {"written": "before"}
    assert time.monotonic() - started >= 8.0
    assert outage_store.read_json("during.json") == {"written": "during"}


def test_long_outage_is_a_clear_error_without_credentials(outage_store, fresh_s3_server, monkeypatch, caplog):
    monkeypatch.setattr(storage, "OUTAGE_RETRY_S", 2.0)
    monkeypatch.setattr(storage, "S3_RETRY_ATTEMPTS", 1)  # the S3 client's own retries would take ~10 s each
    store = Store(outage_store.uri)
    fresh_s3_server.stop()
    with pytest.raises(MdferError) as failure:
        store.write_bytes("never.bin", b"x")
    message = str(failure.value)
    assert message.startswith(f"s3://{fresh_s3_server.bucket}/outage/never.bin: ")
    assert "\n" not in message
    assert "store unreachable" in caplog.text and "retrying in" in caplog.text  # it did try again
    for secret in (fresh_s3_server.env()["AWS_SECRET_ACCESS_KEY"], fresh_s3_server.env()["AWS_ACCESS_KEY_ID"]):
        assert secret not in message
    fresh_s3_server.start()
    assert not outage_store.exists("never.bin")  # nothing half-written


def test_unreachable_endpoint_fails_within_the_limit_with_the_whole_cause(monkeypatch):
    """Connection refused on every attempt: the wall-clock limit (MDFER_STORE_OUTAGE_S) bounds the
    whole operation, the SDK's own attempts included, and the cause is given whole, on one line."""
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused-secret-value")
    monkeypatch.setenv(storage.OUTAGE_ENV, "4")
    monkeypatch.setattr(storage, "S3_RETRY_ATTEMPTS", 2)
    started = time.monotonic()
    with pytest.raises(MdferError) as failure:
        Store("s3://bucket/prefix").write_bytes("x.bin", b"x")
    elapsed = time.monotonic() - started
    message = str(failure.value)
    assert 2.0 <= elapsed < 4 + 10, elapsed  # it retried up to the limit, and not far past it
    assert message.startswith("s3://bucket/prefix/x.bin: store unreachable for ")
    assert f"({storage.OUTAGE_ENV}=4): " in message and "\n" not in message
    cause = message.split(f"({storage.OUTAGE_ENV}=4): ", 1)[1]
    assert len(cause) > 20 and not cause.endswith("...") and "unused-secret-value" not in message
    monkeypatch.setenv(storage.OUTAGE_ENV, "soon")
    with pytest.raises(MdferError, match="MDFER_STORE_OUTAGE_S='soon': expected a number of seconds"):
        Store("s3://bucket/prefix").write_bytes("x.bin", b"x")
