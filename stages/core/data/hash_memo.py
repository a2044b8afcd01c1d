"""File hashes remembered across runs, so an unchanged dataset is not read again to key the cache.

A file's sha256 is stored under its resolved path with its size, modification and change times (in
nanoseconds) and inode; while all of those are unchanged the stored hash is used, and any change
(an edit, a rewrite, a replaced file) hashes the file again. The memo is one JSON file in the lorelay
cache (``$LORELAY_CACHE/file-hashes.json``), rewritten atomically; a damaged or missing memo only
costs a re-hash.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

MEMO_FILE = "file-hashes.json"
_memo: dict[str, dict] | None = None  # loaded once per process


def _memo_path() -> Path:
    from stages.core.default_model import cache_root

    return cache_root() / MEMO_FILE


def _load() -> dict[str, dict]:
    global _memo
    if _memo is None:
        try:
            loaded = json.loads(_memo_path().read_text(encoding="utf-8"))
            _memo = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            _memo = {}
    return _memo


def _save(memo: dict[str, dict]) -> None:
    path = _memo_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".file-hashes-", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(memo, out)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache: the hash is simply not remembered


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def memoised_sha256(path: str | Path, compute: Callable[[Path], str]) -> str:
    """``compute(path)`` (the file's sha256), or the remembered value while the file is unchanged."""
    resolved = Path(path).resolve()
    stamp = _stamp(resolved.stat())
    memo = _load()
    entry = memo.get(str(resolved))
    if entry and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = compute(resolved)
    if _stamp(resolved.stat()) == stamp:  # not remembered when the file changed while it was read
        memo[str(resolved)] = {"stamp": stamp, "sha256": digest}
        _save(memo)
    return digest
