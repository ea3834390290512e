"""Fixtures that run the batch emulator binary for the Python tests.

The binary comes from BATCH_EMULATOR_BIN (default target/debug/batch-emulator
under the repository root); build it first with `cargo build -p batch-emulator`.
Its answers are synthetic: these tests check protocol shapes, never labels.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "tests" / "data"
API_KEY = "sk-python-test"
STARTUP_TIMEOUT_S = 30


def emulator_binary() -> Path:
    configured = Path(os.environ.get("BATCH_EMULATOR_BIN", "target/debug/batch-emulator"))
    path = configured if configured.is_absolute() else REPO_ROOT / configured
    if not path.is_file():
        pytest.fail(
            f"batch emulator binary not found at {path}; run `cargo build -p batch-emulator` "
            "or set BATCH_EMULATOR_BIN",
            pytrace=False,
        )
    return path


@dataclass
class Emulator:
    process: subprocess.Popen[str]
    root_url: str
    api_key: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _read_address(process: subprocess.Popen[str], log_path: Path) -> str:
    """The first stdout line is `listening on http://ADDR`."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    ready = selector.select(timeout=STARTUP_TIMEOUT_S)
    selector.close()
    line = process.stdout.readline() if ready else ""
    prefix = "listening on "
    if not line.startswith(prefix):
        process.kill()
        process.wait()
        pytest.fail(
            f"batch emulator did not start (first line {line!r}); log:\n"
            + log_path.read_text(errors="replace"),
            pytrace=False,
        )
    return line[len(prefix) :].strip()


@contextlib.contextmanager
def run_emulator(*extra_args: str) -> Iterator[Emulator]:
    """Starts the emulator on port 0 with fast delays, stops it afterwards."""
    binary = emulator_binary()
    with tempfile.NamedTemporaryFile(
        prefix="batch-emulator-", suffix=".log", delete=False
    ) as log_file:
        log_path = Path(log_file.name)
    args = [
        str(binary),
        "--listen",
        "127.0.0.1:0",
        "--api-key",
        API_KEY,
        "--validating-ms",
        "20",
        "--in-progress-ms",
        "60",
        "--finalizing-ms",
        "20",
        "--webhook-backoff-ms",
        "20",
        "--webhook-timeout-ms",
        "5000",
        *extra_args,
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
        )
    try:
        root_url = _read_address(process, log_path)
        yield Emulator(process=process, root_url=root_url, api_key=API_KEY, log_path=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log_path.unlink(missing_ok=True)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    with run_emulator() as running:
        yield running


@pytest.fixture
def start_emulator() -> Iterator[Callable[..., Emulator]]:
    """Starts emulators with extra flags; all are stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda *args: stack.enter_context(run_emulator(*args))
