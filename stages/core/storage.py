"""Where outputs go: directories checked for writing before any model loads, and disk faults while
writing turned into one clear line.

A path under a regular file, a read-only mount or a directory without write permission is found by
``check_writable_dir`` at start-up (it writes and deletes a probe file in the nearest existing
directory), not after training. ``disk_faults`` wraps a stage: a full disk, an exceeded quota or a
mount that became read-only while saving is reported with the output directory and what to do;
outputs appear by rename only when complete (``stages.core.training.StageOutput``), so earlier
results are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import tempfile
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import LorelayError

# OSErrors that come from the machine the user runs on, not from lorelay
STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


def check_writable_dir(path: str | Path, *, field: str | None = None, what: str = "directory") -> None:
    """Raise LorelayError unless ``path`` (created on demand later) can be created and written."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise LorelayError(f"cannot create the {what}: '{probe}' is a file, not a directory", file=path,
                           field=field, hint="choose a path that is not under a file")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".lorelay-write-check-"):
            pass
    except OSError as err:
        reason = STORAGE_ERRNOS.get(err.errno, err.strerror or type(err).__name__)
        raise LorelayError(f"cannot write the {what}: {reason} in '{probe}'", file=path, field=field,
                           hint="choose a writable location") from None


@contextlib.contextmanager
def disk_faults(output_dir: str | Path, *, field: str | None = None) -> Iterator[None]:
    """Turn a full disk (or a read-only or forbidden location) met while writing into a LorelayError."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        where = f" ({err.filename})" if err.filename else ""
        raise LorelayError(f"{STORAGE_ERRNOS[err.errno]} while writing the output{where}", file=output_dir,
                           field=field, hint="free space or choose another location, then run the same "
                                             "command again; finished outputs were left as they were") from None


def check_output_dir(output_dir: str | Path, *, field: str | None = None) -> None:
    """A stage's output directory: not a file, and its parent writable (``<output_dir>.partial`` goes there)."""
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise LorelayError("the output directory exists and is a file", file=output_dir, field=field,
                           hint="choose another output directory")
    check_writable_dir(output_dir.parent, field=field, what="output directory")
