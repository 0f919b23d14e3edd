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
