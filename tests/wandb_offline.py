"""Reads an offline W&B run back: the `run-*.wandb` transaction log (LevelDB log format, W&B's own protobuf
records), for tests. wandb no longer ships a Python reader for it, and `wandb sync` only uploads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32768
_HEADER = struct.Struct("<IHB")  # checksum, length, type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _payloads(data: bytes):
    """Each record's bytes: a 7-byte file header (':W&B', magic, version), then 32 KiB blocks of chunks."""
    assert data[:4] == b":W&B", data[:7]
    pos, parts = 7, b""
    while pos + _HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER.size:  # the block's tail is padding
            pos += room
            continue
        _, length, kind = _HEADER.unpack_from(data, pos)
        chunk = data[pos + _HEADER.size:pos + _HEADER.size + length]
        pos += _HEADER.size + length
        if kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = chunk
        elif kind == _MIDDLE:
            parts += chunk
        elif kind == _LAST:
            yield parts + chunk


def run_records(run_dir: Path) -> tuple[str, list[dict]]:
    """(run id, history rows as {key: value}) of one offline run directory (run-<time>-<id>)."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_id, rows = None, []
    for payload in _payloads(next(Path(run_dir).glob("run-*.wandb")).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return run_id, rows
