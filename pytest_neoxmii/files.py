"""Writing a file whole: readers, and a session killed mid-write, only ever see the old complete file or the
new one, never part of it (baselines, the serving-config check cache)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable, TextIO, Union


def write_whole(path: Path, content: Union[str, Callable[[TextIO], object]]) -> None:
    """Write content (a text, or a function writing into the open file) to path through a temporary file in
    the same directory, fsynced, then os.replace()d over it. On any failure the target is untouched and the
    temporary file is gone; the error is raised."""
    # Same directory as the target: os.replace is only atomic within one filesystem. A dot-name keeps it
    # out of the way; pid + random suffix keeps concurrent writers (even without a lock) apart.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # 0o666 minus the umask, like any new file (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            content(f) if callable(content) else f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Whatever went wrong (disk full, KeyboardInterrupt), leave the target untouched and no debris.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
