"""Atomic writes: a reader (or a resumed run) sees the old artifact or the new one, never half of one.

Every artifact of the package is written through this module. A file is written under a temporary
name beside its final path and renamed over it (`os.replace` is atomic on one file system); a folder
is assembled in a staging folder beside its final path and renamed into place. Temporary names start
with `.` and contain `TMP_MARK`, so `remove_stale_temporaries` can find what a killed process left.

A stage checks its output folder before any work (`check_output_folder`) and holds a lock in it
while it writes (`folder_lock`), so two runs never write one folder at once.

Example:

    >>> from fit3d_hf.io import atomic_directory, atomic_write_json
    >>> atomic_write_json("runs/report.json", {"psnr": 26.0})
    >>> with atomic_directory("runs/model", overwrite=True) as staging:
    ...     model.save_pretrained(staging)  # runs/model appears only if this succeeds
"""

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputBusyError, OutputError

# Part of every temporary name this module makes: `.<name>.tmp-<pid>`.
TMP_MARK = ".tmp-"
# The lock a run holds in the folder it writes (`folder_lock`).
LOCK_FILE = ".fit3d.lock"


def temporary_path(path: str | os.PathLike) -> Path:
    """The temporary sibling `.<name>.tmp-<pid>` under which `path` is written before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to write a file at a temporary sibling of `path`, then rename it over `path`.

    The parent folder is created. If `write` raises, the temporary file is removed and `path` keeps
    its previous content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> Path:
    """Write `value` as JSON to `path` atomically."""
    return atomic_write_text(path, json.dumps(value, indent=indent))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Assemble a folder in a staging folder beside `path`; rename it to `path` when the block succeeds.

    Args:
        path: the final folder.
        overwrite: replace an existing `path` (removed only after the new folder is complete);
            otherwise an existing non-empty `path` is a `FileExistsError` before anything is written.

    Yields:
        The staging folder (empty). On an exception it is removed and `path` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists; remove it or choose another output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if path.is_dir():
            # Move the old folder aside first: os.replace cannot replace a non-empty folder.
            old = path.with_name(f".{path.name}.old{TMP_MARK}{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed processes left in `folder` (not recursive).

    Only names made by this module (`.<name>.tmp-<pid>`) whose process is gone are removed; a live
    process's temporaries are left alone. Returns the removed paths.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        name = entry.name
        if not name.startswith(".") or TMP_MARK not in name:
            continue
        pid = name.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_folder(path: str | os.PathLike, *, what: str = "the output") -> Path:
    """Raise an `OutputError` unless `path` can be a folder this process writes: it is a folder or
    absent, and the nearest existing folder at or above it accepts a new file. Creates nothing.

    Call it before any work, so that an unusable output folder is found before hours of computing.

    Args:
        path: the output folder.
        what: what the folder is for, named in the error (e.g. "--output_dir of fit3d lift").
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file, not a folder; choose another output folder or remove the file")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    try:
        # os.access says yes to root on a read-only file system: write a file to know.
        handle, probe = tempfile.mkstemp(prefix=f".write-check{TMP_MARK}{os.getpid()}-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"{what} {path} cannot be written: {existing} refuses new files ({error.strerror})") from error
    return path


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, what: str = "the output") -> Iterator[Path]:
    """Hold `<folder>/.fit3d.lock` while the block runs, so that two runs never write one folder.

    The folder is checked (`check_output_folder`) and created. The lock names this process (pid,
    host, start time, command line); a lock whose process has ended on this host, or that this
    process left in an earlier call that raised, is taken over. On exit the lock is removed, and
    the folder too if this call created it and it is still empty.

    Raises:
        OutputBusyError: another live run holds the lock (the message names it).
        OutputError: the folder cannot be written.
    """
    folder = check_output_folder(folder, what=what)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    _claim(lock, what)
    try:
        yield folder
    finally:
        if (_read_lock(lock) or {}).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _claim(lock: Path, what: str) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    for _ in range(3):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(lock)
            if _is_stale(lock, other):
                lock.unlink(missing_ok=True)
                continue
            other = other or {}
            raise OutputBusyError(
                f"{what} {lock.parent} is being written by another run (pid {other.get('pid', '?')} on "
                f"{other.get('host', '?')}, started {other.get('started', '?')}: {other.get('command', '?')}); wait "
                f"for it to finish or choose another output folder. If that run is gone, delete {lock}"
            ) from None
        with os.fdopen(handle, "w") as f:
            json.dump(holder, f)
        return
    raise OutputBusyError(f"{what} {lock.parent}: could not take the lock {lock} (other runs keep taking it)")


def _read_lock(lock: Path) -> dict | None:
    try:
        value = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_stale(lock: Path, holder: dict | None) -> bool:
    """Whether nobody holds `lock`: its process has ended on this host (or it was left unwritten long ago)."""
    if holder is None:
        # Written between O_EXCL and the first byte by a live process, or abandoned there.
        try:
            return time.time() - lock.stat().st_mtime > 60
        except FileNotFoundError:
            return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False  # another machine's process: it cannot be checked from here
    # This very process holds no lock across calls: one of its own was left by a call that raised.
    return holder["pid"] == os.getpid() or not _process_alive(holder["pid"])
