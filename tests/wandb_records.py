"""Read an offline W&B run file (`run-<id>.wandb`) back, for tests.

wandb 0.31 no longer ships a Python reader (`wandb.sdk.internal.datastore` is gone; the Go core
writes the file), so this walks the documented container itself: a 7-byte header (":W&B",
magic 0xBEE1, version 0), then leveldb-log records in 32 KiB blocks, each with a CRC-32 of
its type byte and data. Every payload is parsed with wandb's own protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path):
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    position, pending = 7, b""
    while position + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer: zero padding
            position += left_in_block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + RECORD_HEADER])
        if (checksum, length, kind) == (0, 0, 0):
            position += left_in_block
            continue
        if position + RECORD_HEADER + length > len(data):
            return  # the writer is still writing this record
        payload = data[position + RECORD_HEADER : position + RECORD_HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == checksum, (
            "corrupt record"
        )
        position += RECORD_HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    for payload in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


@dataclass
class OfflineRun:
    """What one offline run file holds, decoded."""

    directory: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    started: float = 0.0
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)  # pb ArtifactRecord
    exited: bool = False
    exit_code: int | None = None

    def metric(self, key: str) -> list:
        return [row[key] for row in self.history if key in row]

    def table(self, key: str) -> dict:
        """The last table logged under `key`, as its JSON file ({"columns": .., "data": ..})."""
        logged = [row for row in self.history if f"{key}/path" in row]
        assert logged, f"no table {key} in {self.directory}"
        return json.loads((self.directory / "files" / logged[-1][f"{key}/path"]).read_text())


def read_run(run_directory: Path, wait_s: float = 30.0) -> OfflineRun:
    """Decode `offline-run-*/run-<id>.wandb` (config, history, summary, artifacts).

    `run.finish()` returns before wandb-core's writer has necessarily flushed the file (seen:
    a file without even its run record, complete ~0.2 s later), so wait for the exit record first.
    """
    deadline = time.monotonic() + wait_s
    while True:
        run = _decode(Path(run_directory))
        if run.exited or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _decode(run_directory: Path) -> OfflineRun:
    (path,) = run_directory.glob("run-*.wandb")
    run = OfflineRun(directory=run_directory)
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.project = r.run_id, r.display_name, r.project
            run.group, run.job_type, run.tags, run.notes = (
                r.run_group,
                r.job_type,
                list(r.tags),
                r.notes,
            )
            run.started = r.start_time.seconds + r.start_time.nanos / 1e9
            for item in r.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append(
                {_key(item): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "artifact":
            run.artifacts.append(record.artifact)
        elif kind == "exit":
            run.exited, run.exit_code = True, record.exit.exit_code
    return run


def offline_runs(wandb_parent: Path) -> list[OfflineRun]:
    """Every offline run under `<dir>/wandb/`, in the order they started (folder names only
    have whole seconds)."""
    runs = [read_run(path) for path in (Path(wandb_parent) / "wandb").glob("offline-run-*")]
    return sorted(runs, key=lambda run: run.started)
