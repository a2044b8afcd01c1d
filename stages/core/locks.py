"""One writer per directory: a lock for each stage output directory and each run directory.

Two ``lorelay sft`` runs with the same ``training.output_dir`` would delete each other's checkpoints
and race to publish; two ``lorelay run`` on one run directory would interleave ``run.json``. So the
writer takes ``<directory>.lock`` first (a file beside the directory: the directory itself is
replaced by rename when a stage finishes). The lock is an ``fcntl.flock`` on that file, which the
kernel drops when its process dies however it dies (SIGKILL, power loss of a container), so a lock
left by a dead process is never mistaken for a live one: the file stays, with the dead holder's
pid, host and start time, and the next run takes it over and says so. While the holder lives, a
second run stops at once with a message naming it.

A process may take a lock it already holds again (a stage re-run in the same Python process, as tests
do); ``release`` drops it, and a process that exits normally (a failed stage included) releases what it
still holds. Under ``accelerate launch`` only the main process takes locks.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import LorelayError

_HELD: dict[str, "DirectoryLock"] = {}  # this process's locks, by lock-file path


class LockHeld(LorelayError):
    """Another live process is writing this directory."""


class DirectoryLock:
    """An exclusive, crash-safe lock on ``directory`` held through ``<directory>.lock``."""

    def __init__(self, directory: str | Path, *, purpose: str):
        self.directory = Path(directory)
        self.path = self.directory.with_name(self.directory.name + ".lock")
        self.purpose = purpose
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self) -> "DirectoryLock":
        import fcntl

        key = str(self.path.resolve())
        if key in _HELD:
            return _HELD[key]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(descriptor)
                os.close(descriptor)
                raise LockHeld(f"another lorelay process is writing this {self.purpose}: {describe(holder)}",
                               file=self.directory,
                               hint="wait for it to finish, stop it, or choose another output directory") from None
            if _same_file(descriptor, self.path):
                break
            os.close(descriptor)  # the holder released (and unlinked) it between our open and flock: again
        previous = _read_holder(descriptor)
        if previous:  # the file outlived its holder, whose lock died with it
            print(f"lorelay: taking over the lock of {self.directory} from a process that is gone "
                  f"({describe(previous)})", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.argv[:3])}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(descriptor)
        self._descriptor = descriptor
        _HELD[key] = self
        return self

    def release(self) -> None:
        if self._descriptor is None:
            return
        _HELD.pop(str(self.path.resolve()), None)
        # The file goes before the lock is dropped: a waiting process never reads a stale holder from it.
        self.path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(descriptor)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(descriptor: int) -> dict:
    try:
        text = os.pread(descriptor, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "?", "note": "unreadable lock file"}


def describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


@contextlib.contextmanager
def released_on_error() -> Iterator[None]:
    """Release the locks taken inside the block when it raises: a failed stage never blocks the next run."""
    before = set(_HELD)
    try:
        yield
    except BaseException:
        for key in set(_HELD) - before:
            _HELD[key].release()
        raise


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


def lock_directory(directory: str | Path, *, purpose: str) -> DirectoryLock:
    """Take the lock of ``directory`` (or return this process's hold on it); raises ``LockHeld``."""
    return DirectoryLock(directory, purpose=purpose).acquire()
