"""Files and folders the binaries write: checked before any work, files written atomically.

A bad output path (an existing folder where a file goes, a parent that is a file or is
not writable, one of the run's own input files) is reported before anything is
computed, with the flag that named it. A file is written under a temporary name beside
its destination and renamed into place, so a crash or a kill never leaves a half-written
result, and a failed write never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO


def _writable_ancestor(flag: str, path: str, folder: str) -> None:
    """The nearest existing ancestor of ``folder`` must be a writable folder (the rest is created)."""
    ancestor = folder
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"--{flag} {path}: {ancestor} is a file, not a folder")
    try:  # a real write: permission bits say nothing of root, ACLs or read-only mounts
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        raise ValueError(f"--{flag} {path}: cannot write in {ancestor} ({e.strerror})") from None


def check_output_file(flag: str, path: str, inputs: Mapping[str, str | None] | None = None) -> str:
    """``path`` as an absolute path, or ValueError naming ``--flag`` if it cannot be written.

    ``inputs`` maps the flags of the run's input files to their paths: writing over one of
    them is refused, since the run would destroy what it reads.
    """
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"--{flag} {path}: is a folder; expected the path of a file to write")
    _writable_ancestor(flag, path, os.path.dirname(target))
    for name, source in (inputs or {}).items():
        if not source:
            continue
        same = os.path.abspath(source) == target
        if not same and os.path.exists(source) and os.path.exists(target):
            same = os.path.samefile(source, target)
        if same:
            raise ValueError(f"--{flag} {path}: is also the input --{name}; writing it would destroy "
                             "that input, so choose another path")
    return target


def check_output_dir(flag: str, path: str) -> str:
    """``path`` as an absolute path, or ValueError naming ``--flag`` if it cannot be a folder."""
    target = os.path.abspath(path)
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"--{flag} {path}: is a file; expected a folder (existing or new)")
    _writable_ancestor(flag, path, target)
    return target


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success, flush it to disk and rename it to
    ``path``. On an exception the temporary file is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
