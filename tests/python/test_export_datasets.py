"""`shotlabel export --format imagefolder`, loaded with the real Hugging Face `datasets`.

moto (in-process, `ThreadedMotoServer`) stands in for S3. The test puts fixture
screenshots under `incoming/` and label records under `labels/` exactly as the harvest
writes them, has `shotlabel dataset rebuild` write their Parquet parts (as for labels
harvested before the harvest wrote parts), runs `shotlabel export`, which reads the parts,
with the binary (SHOTLABEL_BIN, default target/debug/shotlabel under the repository root;
build it with `cargo build -p shotlabel-cli`), and loads the folder with
`datasets.load_dataset("imagefolder", data_dir=DIR)`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator

import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from conftest import DATA_DIR, REPO_ROOT

BUCKET = "export-datasets-test"
SCREENSHOTS = DATA_DIR / "screenshots"
# key below incoming/ -> fixture file
IMAGES = {
    "saas-landing.png": "saas-landing.png",
    "2024/blog-article.png": "blog-article.png",
    "2024/05/geocities-home.png": "geocities-home.png",
}
HOSTILE_KEY = "incoming/../escape.png"


def shotlabel_binary() -> Path:
    configured = Path(os.environ.get("SHOTLABEL_BIN", "target/debug/shotlabel"))
    path = configured if configured.is_absolute() else REPO_ROOT / configured
    if not path.is_file():
        pytest.fail(
            f"shotlabel binary not found at {path}; run `cargo build -p shotlabel-cli` "
            "or set SHOTLABEL_BIN",
            pytrace=False,
        )
    return path


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_env(endpoint: str, home: Path) -> dict[str, str]:
    """Only what the binary needs: a local endpoint and throwaway credentials."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "SHOTLABEL_BUCKET": BUCKET,
    }


def task_version(binary: Path, env: dict[str, str]) -> str:
    shown = subprocess.run(
        [str(binary), "task", "show"], env=env, capture_output=True, text=True, check=True
    ).stdout
    for line in shown.splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    pytest.fail(f"`shotlabel task show` printed no version:\n{shown}")


def label_record(key: str, etag: str, version: str, answer: dict) -> dict:
    """A label record shaped as the harvest writes it (`LabelRecord`)."""
    return {
        "status": "labelled",
        "label": answer,
        "source": {"bucket": BUCKET, "key": key, "etag": etag, "size": 1},
        "task": {"name": "website-judgement", "version": version},
        "model": "fixture-model",
        "provenance": {"batch_id": "batch_fixture", "custom_id": f"c-{key}"},
        "attempt": 0,
        "labelled_at": 1700000000,
    }


def test_imagefolder_export_loads_with_datasets(
    moto_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = shotlabel_binary()
    env = aws_env(moto_endpoint, tmp_path)
    version = task_version(binary, env)
    truth = json.loads((SCREENSHOTS / "labels.json").read_text())

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=BUCKET)
    expected = {}
    for relative, fixture in {**IMAGES, "../escape.png": "docs-page.png"}.items():
        key = f"incoming/{relative}"
        body = (SCREENSHOTS / fixture).read_bytes()
        etag = s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')
        answer = dict(truth[fixture])
        record = label_record(key, etag, version, answer)
        s3.put_object(
            Bucket=BUCKET, Key=f"labels/{relative}.json", Body=json.dumps(record).encode()
        )
        expected[key] = (fixture, answer)

    rebuilt = subprocess.run(
        [str(binary), "dataset", "rebuild", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    rebuild = json.loads(rebuilt.stdout)
    assert rebuild["parts_written"] == 1 and rebuild["rows_written"] == len(IMAGES) + 1, rebuild

    root = tmp_path / "export"
    out = root / "dataset"
    run = subprocess.run(
        [str(binary), "export", "--format", "imagefolder", "--out", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["images"] == len(IMAGES), summary
    assert summary["parts"] == 1, summary
    assert summary["refused"] == 1, summary
    assert HOSTILE_KEY in run.stderr
    # Nothing was written outside the dataset folder.
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(
        [f"dataset/{r}" for r in IMAGES] + ["dataset/labels.jsonl", "dataset/metadata.jsonl"]
    )

    # Offline: the imagefolder builder ships with `datasets`; nothing is fetched.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = importlib.import_module("datasets")
    dataset = datasets.load_dataset(
        "imagefolder",
        data_dir=str(out),
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )

    assert dataset.num_rows == len(IMAGES)
    assert isinstance(dataset.features["image"], datasets.Image)
    assert {"landing_page", "aesthetic", "key", "etag", "task_version"} <= set(
        dataset.column_names
    )
    seen = set()
    for row in dataset:
        key = row["key"]
        fixture, answer = expected[key]
        image = row["image"]
        with Image.open(SCREENSHOTS / fixture) as original:
            assert image.size == original.size
            assert image.convert("RGB").tobytes() == original.convert("RGB").tobytes()
        assert row["landing_page"] == answer["landing_page"]
        assert row["aesthetic"] == answer["aesthetic"]
        assert row["task_version"] == version
        assert row["model"] == "fixture-model"
        seen.add(key)
    assert seen == {f"incoming/{r}" for r in IMAGES}
