"""Files written whole or not at all.

A checkpoint, adapter, profile or pool written in place is lost when the process dies mid-write
(a killed training run, ``s3d search --remeasure p.json --out p.json``): the old file is already
truncated and the new one is half there. Each is written to a temporary file in the same folder
and moved over the old one in one step (``os.replace``, atomic on one file system). A process
killed outright (SIGKILL, the OOM killer) leaves its temporary file behind: the next write of
the same file removes those a day old (younger ones may be another process's write under way, on
a folder other machines share).
"""

from __future__ import annotations

import glob
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A temporary file this old was left by a process that died writing it.
STALE_TEMPORARY_S = 24 * 3600.0


def _remove_stale_temporaries(path: Path) -> None:
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if time.time() - old.stat().st_mtime > STALE_TEMPORARY_S:
                old.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: harmless either way
            pass


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; once the block ends without an error it is
    flushed to disk and replaces ``path``, else it is removed and ``path`` stays as it was."""
    path = Path(path)
    # A name of our own in the same folder (same file system), hidden, made with the default
    # permissions when the writer creates it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    _remove_stale_temporaries(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """``Path(path).write_text(text)`` (UTF-8), whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
