"""Seconds per stage of `fit3d demo` with its defaults, against another checkout or beside a busy process.

Runs `fit3d demo --fresh` (its default settings) in a fresh process and reads the run folder's
`timings.json`; then, if asked, the same command in another checkout (`--baseline PATH`, e.g.
`git worktree add /tmp/old 2566e3d`) and this checkout again with one CPU-bound process running
beside it (`--busy`), one after the other. The table gives each stage's seconds per run, the
ratios to this checkout's run, and the lifting it/s; the header gives the CPU model, its vector
extensions, the core count, torch's threads and the OpenMP wait policy, and the load average
before and after each run (the machine's other work shows there: quote ratios on a shared
machine, absolute times only from an idle one).

    python benchmarks/demo_stages.py                              # this checkout
    python benchmarks/demo_stages.py --baseline /tmp/old --busy  # before/after and the busy-machine ratio
    python benchmarks/demo_stages.py --threads 1 --output_root /tmp/stages
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from lift_speed import machine  # noqa: E402

STAGES = ("scenes", "lift", "render", "finetune", "evaluate", "card", "pictures")
BUSY_LOOP = "while True: pass"


def run_demo(checkout: Path, run_dir: Path, threads: int, busy: bool) -> dict:
    """`fit3d demo --fresh` in `checkout`, optionally beside one CPU-bound process; its timings and more."""
    command = [sys.executable, "-m", "fit3d_hf.cli", "demo", "--output_dir", str(run_dir), "--fresh"]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    load_before = os.getloadavg()[0]
    competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, check=False)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"fit3d demo in {checkout} failed:\n{done.stderr[-3000:]}")
    timings = json.loads((run_dir / "timings.json").read_text())
    lifted = [json.loads(p.read_text()) for p in sorted((run_dir / "lifted").glob("*.json"))]
    threads_line = next((line for line in done.stdout.splitlines() if "threads" in line and "Wall time" in line), "")
    return {
        "timings": timings,
        "wall_s": wall,
        "lift_it_per_s": [report["iterations_per_second"] for report in lifted],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "summary_line": threads_line.strip(),
        "verdicts": [line for line in (run_dir / "summary.md").read_text().splitlines() if line.startswith("- ")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to run the demo in")
    parser.add_argument("--busy", action="store_true", help="also run this checkout beside one CPU-bound process")
    parser.add_argument("--threads", type=int, default=0, help="--threads for every run (0: the demo's default)")
    parser.add_argument("--output_root", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    runs = {"this": (ROOT, False)}
    if args.baseline:
        runs["baseline"] = (args.baseline.resolve(), False)
    if args.busy:
        runs["this+busy"] = (ROOT, True)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.output_root or Path(tmp)
        results = {
            name: run_demo(checkout, root / name.replace("+", "_"), args.threads, busy) for name, (checkout, busy) in runs.items()
        }

    print(f"CPU: {info['cpu']}; vector extensions: {', '.join(info['vector_extensions']) or 'none found'}; {info['cores']} cores")
    print(f"--threads {args.threads or 'default'}; each run: `fit3d demo --fresh`, its default settings")
    for name, result in results.items():
        print(
            f"  {name}: load average {result['load_before']:.1f} before, {result['load_after']:.1f} after; {result['summary_line']}"
        )
    names = list(results)
    header = "| stage | " + " | ".join(f"{n} (s)" for n in names) + " | " + " | ".join(f"{n} / this" for n in names[1:]) + " |"
    print("\n" + header)
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    rows = [*STAGES, "total_this_run"]
    for stage in rows:
        values = [results[n]["timings"].get(stage) for n in names]
        cells = [f"{v:.1f}" if v is not None else "—" for v in values]
        ratios = [f"{v / values[0]:.2f}" if v is not None and values[0] else "—" for v in values[1:]]
        print(f"| {stage} | " + " | ".join(cells) + (" | " + " | ".join(ratios) if ratios else "") + " |")
    for name in names:
        speeds = ", ".join(f"{v:.2f}" for v in results[name]["lift_it_per_s"])
        print(f"\n{name}: lifting it/s per room {speeds}")
        print("\n".join(results[name]["verdicts"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "threads": args.threads, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
