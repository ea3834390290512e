"""Webhooks from the batch emulator, checked with the official `standardwebhooks`
package and a plain `http.server` receiver."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from openai import OpenAI
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from conftest import DATA_DIR, Emulator
from test_openai_sdk import request_for, wait_for_batch, write_jsonl


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    url: str
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def wait_for(self, count: int, timeout_s: float = 10) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.snapshot()
            if len(got) >= count:
                return got
            time.sleep(0.02)
        pytest.fail(f"only {len(self.snapshot())} of {count} webhook requests arrived")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recv = holder["receiver"]
            with recv.lock:
                recv.received.append(
                    Received(self.command, self.path, dict(self.headers.items()), body)
                )
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = _record
        do_OPTIONS = _record

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host, port = server.server_address[:2]
    holder["receiver"] = Receiver(url=f"http://{host}:{port}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder["receiver"]
    finally:
        server.shutdown()
        server.server_close()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode("ascii")


def run_one_batch(emulator: Emulator, tmp_path: Path, **create_extra) -> str:
    client = OpenAI(base_url=emulator.base_url, api_key=emulator.api_key)
    input_path = tmp_path / "one.jsonl"
    image = (DATA_DIR / "screenshots" / "pricing-table.png").read_bytes()
    write_jsonl(input_path, [request_for("pricing-table", image)])
    uploaded = client.files.create(file=open(input_path, "rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        **create_extra,
    )
    assert wait_for_batch(client, batch.id).status == "completed"
    return batch.id


def test_standard_webhook_verifies_with_official_package(
    start_emulator, receiver: Receiver, tmp_path: Path
) -> None:
    secret = new_secret()
    emulator = start_emulator("--webhook-url", f"{receiver.url}/openai", "--webhook-secret", secret)
    batch_id = run_one_batch(emulator, tmp_path)

    (delivery,) = receiver.wait_for(1)
    assert delivery.method == "POST"
    event = Webhook(secret).verify(delivery.body, delivery.headers)
    assert event["object"] == "event"
    assert event["type"] == "batch.completed"
    assert event["data"] == {"id": batch_id}
    assert event["id"].startswith("evt_")

    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(delivery.body.replace(b"completed", b"cancelled"), delivery.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(delivery.body, delivery.headers)

    # Neither the secret nor the API key reaches the log.
    assert emulator.api_key not in emulator.log()
    assert secret not in emulator.log()
    assert secret.removeprefix("whsec_") not in emulator.log()


def test_rotated_secrets_both_verify(start_emulator, receiver: Receiver, tmp_path: Path) -> None:
    old, new = new_secret(), new_secret()
    emulator = start_emulator(
        "--webhook-url", receiver.url, "--webhook-secret", old, "--webhook-secret", new
    )
    run_one_batch(emulator, tmp_path)
    (delivery,) = receiver.wait_for(1)
    assert len(delivery.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(delivery.body, delivery.headers)
    Webhook(new).verify(delivery.body, delivery.headers)


def test_per_batch_webhook_url_gets_options_then_post(
    emulator: Emulator, receiver: Receiver, tmp_path: Path
) -> None:
    batch_id = run_one_batch(
        emulator, tmp_path, extra_body={"webhook_url": f"{receiver.url}/hook/tok123"}
    )
    got = receiver.wait_for(2)
    assert [r.method for r in got] == ["OPTIONS", "POST"]
    post = got[1]
    assert post.path == "/hook/tok123"
    headers = {k.lower(): v for k, v in post.headers.items()}
    assert headers["x-inference-event"] == "batch.completed"
    assert headers["x-inference-webhook-id"]
    # The body's exact shape is not promised; it is JSON naming the batch.
    assert batch_id in json.dumps(json.loads(post.body))
