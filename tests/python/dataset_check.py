"""Reads a harvest's dataset parts with pyarrow and DuckDB and holds them to its labels.

Run by `tests/tests/integration/dataset.rs` (not collected by pytest on its own):

    python dataset_check.py DIR TASK_NAME
    python dataset_check.py export DIR TASK_NAME   # DIR/export/labels.parquet, with datasets

DIR holds `dataset/task=.../version=.../batch=.../part-N.parquet` as the harvest wrote
it and `labels.jsonl`, the label objects (`labels/<key>.json`) of the same harvest, one
per line. Every column must have the type the task's JSON Schema maps to (written out
here, independently of the Rust mapping), every label must be exactly one row with the
same values, and no row may lack a label.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

PROVENANCE = {
    "source_bucket": pa.string(),
    "source_key": pa.string(),
    "source_etag": pa.string(),
    "source_size": pa.int64(),
    "custom_id": pa.string(),
    "batch_id": pa.string(),
    "model": pa.string(),
    "task_version": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "attempt": pa.int64(),
    "labelled_at": pa.timestamp("ms", tz="UTC"),
}

# The answer columns of each task, from its schema: boolean -> BOOLEAN, integer -> INT64,
# string -> STRING, array of strings -> LIST<STRING>.
ANSWERS = {
    "website-judgement": {"landing_page": pa.bool_(), "aesthetic": pa.int64()},
    "caption": {"caption": pa.string(), "tags": pa.list_(pa.string())},
}

DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("ms", tz="UTC"): "TIMESTAMP WITH TIME ZONE",
    pa.list_(pa.string()): "VARCHAR[]",
}


def expected_row(label: dict, answer_columns: dict) -> dict:
    usage = label["provenance"].get("usage") or {}
    row = {name: label["label"].get(name) for name in answer_columns}
    row.update(
        {
            "source_bucket": label["source"]["bucket"],
            "source_key": label["source"]["key"],
            "source_etag": label["source"]["etag"],
            "source_size": label["source"]["size"],
            "custom_id": label["provenance"]["custom_id"],
            "batch_id": label["provenance"]["batch_id"],
            "model": label["model"],
            "task_version": label["task"]["version"],
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "attempt": label["attempt"],
            "labelled_at": dt.datetime.fromtimestamp(label["labelled_at"], tz=dt.timezone.utc),
        }
    )
    return row


def fail(message: str) -> None:
    print(f"dataset_check: {message}", file=sys.stderr)
    sys.exit(1)


def check_pyarrow(parts: list[Path], columns: dict, expected: dict) -> None:
    rows = []
    for part in parts:
        table = pq.read_table(part)
        types = {field.name: field.type for field in table.schema}
        if types != columns:
            fail(f"{part.name}: pyarrow reads the columns as {types}, expected {columns}")
        rows.extend(table.to_pylist())
    by_key = {}
    for row in rows:
        if row["source_key"] in by_key:
            fail(f"two rows for {row['source_key']}")
        by_key[row["source_key"]] = row
    if set(by_key) != set(expected):
        fail(
            f"pyarrow rows {sorted(by_key)} do not match the labels {sorted(expected)}"
        )
    for key, want in expected.items():
        if by_key[key] != want:
            fail(f"pyarrow row for {key}: {by_key[key]} != label {want}")
    print(f"pyarrow: {len(rows)} rows, types and values match the labels")


def check_duckdb(root: Path, task: str, columns: dict, expected: dict, version: str) -> None:
    con = duckdb.connect()
    source = (
        f"read_parquet('{root}/dataset/*/*/*/*.parquet', hive_partitioning = true, "
        "hive_types = {'task': VARCHAR, 'version': VARCHAR, 'batch': VARCHAR})"
    )
    described = {
        name: kind for name, kind, *_ in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
    }
    for name, arrow_type in columns.items():
        if described.get(name) != DUCKDB_TYPES[arrow_type]:
            fail(f"DuckDB reads {name} as {described.get(name)}, expected {DUCKDB_TYPES[arrow_type]}")
    names = list(columns)
    select = ", ".join(f'"{n}"' for n in names)
    result = con.execute(f"SELECT {select}, task, version, batch FROM {source}").fetchall()
    if len(result) != len(expected):
        fail(f"DuckDB reads {len(result)} rows, the labels are {len(expected)}")
    for values in result:
        row = dict(zip(names + ["task", "version", "batch"], values))
        want = expected.get(row["source_key"])
        if want is None:
            fail(f"DuckDB row for {row['source_key']} has no label")
        if (row["task"], row["version"], row["batch"]) != (task, version, want["batch_id"]):
            fail(f"DuckDB's partition columns for {row['source_key']}: {row}")
        got = {n: row[n] for n in names}
        # DuckDB hands the UTC timestamp back in the session's time zone: compare instants.
        if got["labelled_at"] != want["labelled_at"]:
            fail(f"DuckDB labelled_at {got['labelled_at']} != {want['labelled_at']}")
        got["labelled_at"] = want["labelled_at"]
        if got != want:
            fail(f"DuckDB row for {row['source_key']}: {got} != label {want}")
    # The first query a user runs: counts per value of the first answer field.
    first = next(iter(ANSWERS[task]))
    if columns[first] != pa.list_(pa.string()):
        counted = dict(
            con.execute(f'SELECT "{first}", count(*) FROM {source} GROUP BY 1').fetchall()
        )
        truth: dict = {}
        for want in expected.values():
            truth[want[first]] = truth.get(want[first], 0) + 1
        if counted != truth:
            fail(f"DuckDB counts per {first}: {counted} != {truth}")
    print(f"duckdb: {len(result)} rows, types, values and partition columns match")


def check_export(root: Path, task: str, expected: dict) -> None:
    """`shotlabel export --format parquet` output, loaded with Hugging Face datasets."""
    import datasets

    loaded = datasets.load_dataset(
        "parquet",
        data_files=str(root / "export" / "labels.parquet"),
        split="train",
        cache_dir=str(root / "hf-cache"),
    )
    if loaded.num_rows != len(expected):
        fail(f"datasets loads {loaded.num_rows} rows, the labels are {len(expected)}")
    for row in loaded:
        want = expected.get(row["source_key"])
        if want is None:
            fail(f"exported row for {row['source_key']} has no label")
        for name in ANSWERS[task]:
            if row[name] != want[name]:
                fail(f"exported {name} of {row['source_key']}: {row[name]} != {want[name]}")
        if row["batch_id"] != want["batch_id"] or row["custom_id"] != want["custom_id"]:
            fail(f"exported provenance of {row['source_key']}: {row}")
    print(f"datasets: {loaded.num_rows} exported rows match the labels")


def main() -> None:
    export = sys.argv[1] == "export"
    args = sys.argv[2:] if export else sys.argv[1:]
    root = Path(args[0])
    task = args[1]
    columns = {**ANSWERS[task], **PROVENANCE}
    labels = [
        json.loads(line)
        for line in (root / "labels.jsonl").read_text().splitlines()
        if line.strip()
    ]
    if not labels:
        fail("no labels to check against")
    expected = {label["source"]["key"]: expected_row(label, ANSWERS[task]) for label in labels}
    if export:
        check_export(root, task, expected)
        return
    versions = {label["task"]["version"] for label in labels}
    if len(versions) != 1:
        fail(f"labels of several task versions: {versions}")
    parts = sorted((root / "dataset").rglob("*.parquet"))
    if not parts:
        fail("no parts")
    for part in parts:
        relative = part.relative_to(root).parts
        if relative[1] != f"task={task}" or relative[2] != f"version={next(iter(versions))}":
            fail(f"part at {'/'.join(relative)}")
    check_pyarrow(parts, columns, expected)
    check_duckdb(root, task, columns, expected, next(iter(versions)))


if __name__ == "__main__":
    main()
