"""Files and ids every stage shares: JSONL, the resumable shard store, request ids."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def request_id(*parts: Any) -> str:
    """A deterministic id from what defines a request (image hash, template, model, sampling,
    turn, sample index): the same request always gets the same id."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ShardStore:
    """Append-only JSONL shards. A record's shard is fixed by its id, so reruns append to the
    same files; reading skips (and repairs) a torn last line left by a kill."""

    def __init__(self, root: Path, n_shards: int = 4):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.n_shards = n_shards

    def path(self, k: int) -> Path:
        return self.root / f"part-{k:05d}.jsonl"

    def shard_of(self, rid: str) -> int:
        return int(hashlib.sha256(rid.encode()).hexdigest(), 16) % self.n_shards

    def shards(self) -> list[Path]:
        """Every shard on disk, also those of a run with another ``n_shards``."""
        return sorted(self.root.glob("part-*.jsonl"))

    def repair(self) -> int:
        """Cut every shard back to its last complete line; returns how many bytes were dropped."""
        dropped = 0
        for p in self.shards():
            data = p.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                with open(p, "r+b") as fh:
                    fh.truncate(keep)
                    fh.flush()
                    os.fsync(fh.fileno())
                dropped += len(data) - keep
        return dropped

    def records(self) -> Iterator[dict[str, Any]]:
        for p in self.shards():
            with open(p) as fh:
                for line in fh:
                    if line.endswith("\n"):
                        yield json.loads(line)

    def done_ids(self) -> set[str]:
        return {r["request_id"] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with open(self.path(self.shard_of(record["request_id"])), "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def all_sorted(self) -> list[dict[str, Any]]:
        return sorted(self.records(), key=lambda r: r["id"])


def jsonl_lines(path: Path | str, error: type[Exception] = ValueError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSONL file. A file that cannot
    be read, or a line that is not JSON, raises ``error`` with the file and line in its message."""
    try:
        fh = open(path, encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from exc
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}: line {n}: not valid JSON ({exc.msg})") from exc
            yield n, value


def write_jsonl(path: Path, records: Iterable[dict[str, Any]], append: bool = False) -> None:
    """One JSON object per line, keys sorted (the same records always give the same bytes)."""
    with open(path, "a" if append else "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")


def read_jsonl(path: Path | str) -> list[Any]:
    """Every record of a JSONL file (``jsonl_lines``' errors)."""
    return [value for _, value in jsonl_lines(path)]
