"""The original notebook's flow, with the official `openai` SDK's calls unchanged,
against the batch emulator. The answers are synthetic; only their shape is checked."""

from __future__ import annotations

import base64
import json
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from conftest import DATA_DIR, Emulator

MODEL = "google/gemma-3-27b-instruct/bf-16"
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["landing_page", "aesthetic"],
    "properties": {
        "landing_page": {"type": "boolean"},
        "aesthetic": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
    },
}
SYSTEM_PROMPT = (
    "You are an experienced web designer reviewing screenshots of websites. "
    'Reply with JSON only, for example {"landing_page": true, "aesthetic": 4}.'
)


def client_for(emulator: Emulator, **kwargs) -> OpenAI:
    return OpenAI(base_url=emulator.base_url, api_key=emulator.api_key, **kwargs)


def request_for(custom_id: str, image: bytes, mime: str = "image/png") -> dict:
    data_uri = f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "temperature": 0.1,
            "max_tokens": 300,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Classify this screenshot."},
                        {"type": "image_url", "image_url": {"url": data_uri}},
                    ],
                },
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "website_judgement", "strict": True, "schema": SCHEMA},
            },
        },
    }


def write_jsonl(path: Path, requests: list[dict]) -> None:
    with open(path, "w") as f:
        for request in requests:
            f.write(json.dumps(request) + "\n")


def wait_for_batch(client: OpenAI, batch_id: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.05)


def parse_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def assert_valid_answer(content: str) -> None:
    answer = json.loads(content)
    assert set(answer) == {"landing_page", "aesthetic"}, answer
    assert isinstance(answer["landing_page"], bool)
    assert isinstance(answer["aesthetic"], int) and not isinstance(answer["aesthetic"], bool)
    assert answer["aesthetic"] in (1, 2, 3, 4, 5)


def test_notebook_flow_with_openai_sdk(emulator: Emulator, tmp_path: Path) -> None:
    screenshots = sorted((DATA_DIR / "screenshots").glob("*.png"))
    assert len(screenshots) >= 10
    requests = [request_for(path.stem, path.read_bytes()) for path in screenshots]
    input_path = tmp_path / "batch_input.jsonl"
    write_jsonl(input_path, requests)

    client = client_for(emulator)
    batch_input_file = client.files.create(file=open(input_path, "rb"), purpose="batch")
    assert batch_input_file.purpose == "batch"
    assert batch_input_file.bytes == input_path.stat().st_size

    batch = client.batches.create(
        input_file_id=batch_input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"description": "website judgement"},
    )
    assert batch.status == "validating"
    assert batch.metadata == {"description": "website judgement"}

    batch = wait_for_batch(client, batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts.total == len(requests)
    assert batch.request_counts.completed == len(requests)
    assert batch.request_counts.failed == 0
    assert batch.error_file_id is None

    output = client.files.content(batch.output_file_id).text
    lines = parse_jsonl(output)
    custom_ids = [line["custom_id"] for line in lines]
    assert sorted(custom_ids) == sorted(r["custom_id"] for r in requests)
    assert len(set(custom_ids)) == len(custom_ids), "each custom_id answered once"
    for line in lines:
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        choice = line["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert_valid_answer(choice["message"]["content"])


def test_undecodable_images_land_in_the_error_file(emulator: Emulator, tmp_path: Path) -> None:
    awkward = DATA_DIR / "awkward"
    requests = [
        request_for("good", (DATA_DIR / "screenshots" / "login-modal.png").read_bytes()),
        request_for("not-an-image", (awkward / "not-an-image.png").read_bytes()),
        request_for("truncated", (awkward / "truncated.png").read_bytes()),
    ]
    input_path = tmp_path / "awkward.jsonl"
    write_jsonl(input_path, requests)

    client = client_for(emulator)
    uploaded = client.files.create(file=open(input_path, "rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "completed"
    assert batch.request_counts.completed == 1
    assert batch.request_counts.failed == 2

    outputs = parse_jsonl(client.files.content(batch.output_file_id).text)
    assert [line["custom_id"] for line in outputs] == ["good"]
    errors = parse_jsonl(client.files.content(batch.error_file_id).text)
    assert sorted(line["custom_id"] for line in errors) == ["not-an-image", "truncated"]
    for line in errors:
        assert line["response"] is None
        assert line["error"]["code"] == "invalid_image"
        assert line["error"]["message"]


def test_validation_failure_and_cancel(emulator: Emulator, tmp_path: Path) -> None:
    client = client_for(emulator)
    image = (DATA_DIR / "awkward" / "pixel.png").read_bytes()
    duplicate = [request_for("same", image), request_for("same", image)]
    input_path = tmp_path / "dup.jsonl"
    write_jsonl(input_path, duplicate)
    uploaded = client.files.create(file=open(input_path, "rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = wait_for_batch(client, batch.id)
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "duplicate_custom_id"
    assert batch.errors.data[0].line == 2

    write_jsonl(input_path, [request_for("one", image)])
    uploaded = client.files.create(file=open(input_path, "rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling"
    assert wait_for_batch(client, batch.id).status == "cancelled"


def test_sdk_errors_for_bad_key_and_unknown_ids(emulator: Emulator) -> None:
    with pytest.raises(openai.AuthenticationError) as excinfo:
        OpenAI(base_url=emulator.base_url, api_key="sk-wrong", max_retries=0).batches.retrieve(
            "batch_x"
        )
    assert "sk-wrong" not in str(excinfo.value)
    with pytest.raises(openai.NotFoundError):
        client_for(emulator, max_retries=0).batches.retrieve("batch_does_not_exist")


def test_sdk_retries_injected_429s(start_emulator) -> None:
    # About half the calls are refused; the SDK's own retries (honouring
    # retry-after-ms) get every call through.
    running = start_emulator("--fault-http-429", "0.5", "--seed", "11")
    client = client_for(running, max_retries=10)
    for _ in range(10):
        assert client.batches.list().data == []
    request = urllib.request.Request(
        f"{running.root_url}/admin/stats",
        headers={"Authorization": f"Bearer {running.api_key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        stats = json.load(response)
    assert stats["faults"]["http_429"] > 0
