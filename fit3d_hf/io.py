"""Atomic writes: a reader (or a resumed run) sees the old artifact or the new one, never half of one.

Every artifact of the package is written through this module. A file is written under a temporary
name beside its final path and renamed over it (`os.replace` is atomic on one file system); a folder
is assembled in a staging folder beside its final path and renamed into place. Temporary names start
with `.` and contain `TMP_MARK`, so `remove_stale_temporaries` can find what a killed process left.

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Part of every temporary name this module makes: `.<name>.tmp-<pid>`.
TMP_MARK = ".tmp-"


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
