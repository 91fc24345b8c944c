"""Files written whole or not at all.

A checkpoint, adapter, profile or pool written in place is lost when the process dies mid-write
(a killed training run, ``s3d search --remeasure p.json --out p.json``): the old file is already
truncated and the new one is half there. Each is written to a temporary file in the same folder
and moved over the old one in one step (``os.replace``, atomic on one file system).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; once the block ends without an error it is
    flushed to disk and replaces ``path``, else it is removed and ``path`` stays as it was."""
    path = Path(path)
    # A name of our own in the same folder (same file system), hidden, made with the default
    # permissions when the writer creates it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
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
