"""Files written whole or not at all, and file hashes.

Every file the kit writes that a later step trusts (a cache entry, a report, a marker, a
published dir) goes through here: written beside its target and renamed into place, so a crash
never leaves half a file that looks complete. JSON is written strictly (no NaN/Infinity), so
every file the kit writes is standard JSON that any reader accepts.

Modes: what the kit writes gets the modes a plain `open()` / `mkdir()` gives under the umask
(0644 files, 0755 dirs under umask 022), so a model dir another user or a container reads is
readable. Two writers do not: `tempfile.mkdtemp` (the staging dir) makes its dir 0700, and
safetensors 0.8's writer (a Rust `NamedTempFile` renamed into place) makes every `.safetensors`
0600 whatever the umask (safetensors/safetensors#782). `umask_modes` puts them right.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from still.errors import StillError


def _staging_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` through a sibling temp file and a rename."""
    path = Path(path)
    staging = _staging_name(path)
    try:
        with staging.open("wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(staging, path)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise StillError(f"cannot write {path}: {error.strerror}") from None
    return path


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def json_text(value, *, indent: int | None = 2) -> str:
    """Standard JSON: a NaN or infinity is a bug in the caller, never written as `NaN`."""
    return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False, default=str) + "\n"


def atomic_write_json(
    path: str | Path, value, *, indent: int | None = 2, fsync: bool = False
) -> Path:
    return atomic_write_text(path, json_text(value, indent=indent), fsync=fsync)


def _umask() -> int:
    # the umask can only be read by setting it; it is put back at once
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_modes(root: str | Path) -> None:
    """Give `root` and everything under it the modes `open()` / `mkdir()` give under the umask:
    0o666 & ~umask for a file (0o777 & ~umask if it was executable), 0o777 & ~umask for a dir.
    Links are left alone (their targets are not ours)."""
    mask = _umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        path.chmod((0o777 if executable else 0o666) & ~mask)


@contextlib.contextmanager
def staged_dir(target: str | Path, *, replace: bool = False):
    """Yield an empty dir beside `target`; on success it becomes `target` (replacing an old one
    when `replace`), with the umask's modes (`umask_modes`); on any failure it is removed and
    `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        umask_modes(staging)  # before the rename: `target` never appears owner-only
        if target.exists() or target.is_symlink():
            if not replace:
                raise StillError(f"{target} appeared while it was being written", hint="run again")
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
