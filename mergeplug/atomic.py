"""Files replaced whole: written beside their destination and renamed over it, so a reader, or a run that was
interrupted, finds the old file or the new one, never part of one.

Every result file mergeplug writes (reports, summaries, manifests, plots, caches) goes through here, so they
all get the same permissions a plain ``open`` would give (``tempfile.mkstemp`` makes files private) and none
leaves a temporary file behind when writing fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file open for writing (``mode`` "w" text in UTF-8, or "wb") beside ``path``, renamed over ``path``
    when the block ends; removed, and ``path`` left as it was, when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as handle:
        handle.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | Path, data: Any, **options: Any) -> None:
    """``data`` as indented JSON and a newline; ``options`` go to :func:`json.dumps` (default: indent 2,
    non-ASCII kept as is, anything else written as ``str``)."""
    write_text(path, json.dumps(data, **{"indent": 2, "ensure_ascii": False, "default": str, **options}) + "\n")
