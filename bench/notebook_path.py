"""The original notebook's preparation path, for `shotlabel-bench prep-vs-notebook`.

Per image, as the seed notebook did it: PIL `Image.open` -> `convert("RGB")` -> PNG
`save(optimize=True)` into memory -> base64 -> a `data:image/png;base64,` URI in the same
request body the submitter sends (system prompt, user text and image, strict
`response_format`, sampling), one JSON line per image.

    python bench/notebook_path.py --template T.json --out F.jsonl [--processes N] FILE...

`--template` is one request line whose image URL is a placeholder (the bench writes it from
the task, so both sides send the same prompt and schema). `--processes 1` is the notebook
as it ran (one process); `--processes 2` uses both cores through `multiprocessing`, for a
fair comparison with `shotlabel prep`. Lines are written in input order. The last stdout
line has the same shape as `shotlabel prep`'s summary:

    images N lines N bytes N failed N seconds S

`seconds` runs from before the inputs are read to after the last line is flushed (the
interpreter's start and imports are not counted, as `shotlabel prep`'s start is not).
"""

import argparse
import base64
import copy
import io
import json
import multiprocessing
import sys
import time

from PIL import Image

PLACEHOLDER = "__IMAGE_DATA_URI__"

_template = None


def _init(template):
    global _template
    _template = template


def _set_image(value, uri):
    """Replaces the placeholder URL wherever it is in the body (the user message)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if v == PLACEHOLDER:
                value[k] = uri
            else:
                _set_image(v, uri)
    elif isinstance(value, list):
        for v in value:
            _set_image(v, uri)


def prepare(job):
    index, path = job
    try:
        image = Image.open(path)
        image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        line = copy.deepcopy(_template)
        line["custom_id"] = f"notebook-{index}"
        _set_image(line, uri)
        return index, json.dumps(line), None
    except Exception as e:  # the notebook skipped what it could not open
        return index, None, f"{path}: {e}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--template", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    started = time.perf_counter()
    with open(args.template, encoding="utf-8") as f:
        template = json.load(f)
    jobs = list(enumerate(args.files))
    lines = failed = written = 0
    with open(args.out, "w", encoding="utf-8") as out:
        if args.processes <= 1:
            _init(template)
            results = map(prepare, jobs)
            pool = None
        else:
            pool = multiprocessing.Pool(args.processes, initializer=_init, initargs=(template,))
            results = pool.imap(prepare, jobs, chunksize=1)
        for _, line, error in results:
            if line is None:
                failed += 1
                print(f"failed {error}", file=sys.stderr)
                continue
            out.write(line)
            out.write("\n")
            lines += 1
            written += len(line.encode("utf-8")) + 1
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - started
    print(f"images {len(jobs)} lines {lines} bytes {written} failed {failed} seconds {seconds:.3f}")


if __name__ == "__main__":
    main()
