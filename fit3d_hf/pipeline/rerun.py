"""The demo's one rerun rule, and the run folder's record `demo.json` it reads and writes.

`demo.json` marks a folder as a demo run folder (`--fresh` deletes nothing else) and holds one
record per stage that has started:

    {"started": "...", "stages": {"lift": {"settings": {...}, "complete": true}, ...}}

`settings` are the values the stage's artifact depends on (`config.stage_settings`). `run_stage`
applies the rule to a stage:

- no record: the stage is recorded as started, runs, and is recorded as complete;
- a record with other settings (complete or not): refused (`DemoError` naming the changed settings,
  and the fix: `--fresh` or another `--output_dir`) — results of two settings are never mixed; except
  for a derived stage (`redo_when_changed`: its artifact is computed cheaply from other stages'
  artifacts only, like the verdicts across replications, the card and the summary), which runs again
  with the new settings — so adding replications to a finished run redoes only those;
- complete with the same settings: skipped;
- started with the same settings but not complete (a killed run): the stage runs again and its own
  resume mechanism picks up what was left (lift checkpoints, render parts, finetune checkpoints,
  the evaluation cache).
"""

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fit3d_hf.io import atomic_write_json, remove_stale_temporaries

from .config import DemoConfig, DemoError

RECORD_FILE = "demo.json"


def prepare_run_folder(config: DemoConfig) -> Path:
    """Create (or, with `config.fresh`, recreate) the run folder `config.output_dir` and its record.

    Raises:
        DemoError: the folder holds something other than a demo run (it is never deleted), or a
            run of an older record format.
    """
    out = Path(config.output_dir)
    record = out / RECORD_FILE
    if out.exists() and any(out.iterdir()) and not record.exists():
        raise DemoError(f"{out} exists and is not a demo run folder (no {RECORD_FILE}); choose another --output_dir")
    if config.fresh and out.exists():
        shutil.rmtree(out)
    if record.exists():
        if "stages" not in read_record(out):
            raise DemoError(
                f"{out} holds a run of an older fit3d demo (no stage records); add --fresh or choose another --output_dir"
            )
        # What a killed run left half-written (staged folders of atomic writes) is never resumed from.
        remove_stale_temporaries(out)
        return out
    atomic_write_json(record, {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "stages": {}})
    return out


def read_record(run_dir: str | Path) -> dict:
    """The content of `<run_dir>/demo.json`."""
    return json.loads((Path(run_dir) / RECORD_FILE).read_text())


def run_stage(
    run_dir: str | Path, stage: str, settings: dict[str, Any], work: Callable[[], Any], redo_when_changed: bool = False
) -> bool:
    """Apply the rerun rule (module docstring) to `stage`: run `work()`, resume it, skip it or refuse.

    Args:
        run_dir: a folder made by `prepare_run_folder`.
        stage: the stage's name (its key in the record).
        settings: the values its artifact depends on (JSON-serialisable).
        work: writes the stage's artifact into `run_dir`; called again after an interruption, so it
            must resume from (or redo) what an earlier call left.
        redo_when_changed: the stage is derived (module docstring): other settings redo it instead of refusing.

    Returns:
        True when `work` ran, False when the stage was complete with these settings and skipped.

    Raises:
        DemoError: the stage was made (or started) with other settings.
    """
    run_dir = Path(run_dir)
    settings = json.loads(json.dumps(settings))  # compared as stored: tuples are lists in JSON
    record = read_record(run_dir)
    previous = record["stages"].get(stage)
    if previous is not None:
        old = previous["settings"]
        changed = {key: (old.get(key), settings.get(key)) for key in {**old, **settings} if old.get(key) != settings.get(key)}
        if changed and redo_when_changed:
            print(f"{stage}: made with other settings ({', '.join(sorted(changed))}): redone")
            previous = None
        elif changed:
            listed = ", ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in changed.items())
            verb = "made" if previous["complete"] else "started"
            raise DemoError(
                f"{run_dir}: its {stage} stage was {verb} with other settings ({listed}); "
                "add --fresh to start over or choose another --output_dir"
            )
    if previous is not None and previous["complete"]:
        print(f"{stage}: complete, made with these settings: skipped")
        return False
    if previous is not None:
        print(f"{stage}: started with these settings by a run that stopped: resuming")
    else:
        record["stages"][stage] = {"settings": settings, "complete": False}
        atomic_write_json(run_dir / RECORD_FILE, record)
    work()
    record["stages"][stage]["complete"] = True
    atomic_write_json(run_dir / RECORD_FILE, record)
    return True
