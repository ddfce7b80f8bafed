"""Files named inside capture files stay inside the capture folder, unless the user allows otherwise.

A capture (transforms.json, a COLMAP model, an evaluation split file) names the files it uses. A
name such as `../../home/me/.ssh/id.png` or `/etc/x.png` would pull any readable image on the
machine into a targets dataset, and from there to the Hub with `--push_to_hub`. `inside` refuses
such names, naming the file and the entry, unless `allow_external_paths` is given. The check is
on the names (normalised, `..` applied), not on symbolic links: a link the user placed inside the
capture folder is theirs to place.
"""

from __future__ import annotations

import os
from pathlib import Path

from fit3d_hf.scenes.images import SceneError

ALLOW_HINT = "pass --allow_external_paths (allow_external_paths=True in Python) if you trust these files"


def inside(root: Path, base: Path, entry: str, *, source: str, what: str, allow_external_paths: bool = False) -> Path:
    """`base / entry`, refused unless it stays inside the capture folder `root`.

    Args:
        root: the capture (or dataset) folder: every file a capture names must lie under it.
        base: the folder `entry` is relative to (`root` or a folder under it).
        entry: the name as the capture file writes it.
        source: the capture file, named in the error.
        what: the entry, named in the error (e.g. "frame 3 file_path").
        allow_external_paths: accept names outside `root` (absolute, or `..` past it).

    Raises:
        SceneError: `entry` points outside `root` and `allow_external_paths` is False.
    """
    path = base / entry
    if allow_external_paths:
        return path
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    if os.path.isabs(entry) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise SceneError(
            f"{source}: {what} '{entry}' points outside {root}; the files it names must lie inside that folder. "
            f"Move the file into {root}, or {ALLOW_HINT}"
        )
    return path
