"""Seconds per stage of `fit3d demo` with its defaults, against another checkout or beside a busy process.

Runs `fit3d demo --fresh` (its default settings) in a fresh process and reads the run folder's
`timings.json`; then, if asked, the same command in another checkout (`--baseline PATH`, e.g.
`git worktree add /tmp/old 2566e3d`) and this checkout again with one CPU-bound process running
beside it (`--busy`), one after the other (`--together`: this checkout and the baseline at the
same time, so that both see the same load; then the busy run). Two tables give each stage's
wall-clock seconds and CPU seconds (sampled from /proc while the run lasts), each with the ratios
to this checkout's run; then
the lifting it/s and the verdicts. The header gives the CPU model, its vector extensions, the
core count, torch's threads and the OpenMP wait policy, and the load average before and after
each run (the machine's other work shows there: quote ratios or CPU seconds on a shared machine,
wall-clock times only from an idle one).

    python benchmarks/demo_stages.py                              # this checkout
    python benchmarks/demo_stages.py --baseline /tmp/old --busy  # before/after and the busy-machine ratio
    python benchmarks/demo_stages.py --baseline /tmp/old --together --threads 1  # both at once, CPU seconds
    python benchmarks/demo_stages.py --threads 1 --output_root /tmp/stages
"""

import argparse
import bisect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from lift_speed import machine  # noqa: E402

STAGES = ("scenes", "lift", "render", "finetune", "evaluate", "card", "pictures")
BUSY_LOOP = "while True: pass"


class DemoRun:
    """`fit3d demo --fresh` in `checkout`, started now in a fresh process (optionally beside one
    CPU-bound process), with its CPU seconds sampled from /proc while it runs."""

    def __init__(self, checkout: Path, run_dir: Path, threads: int, busy: bool):
        command = [sys.executable, "-m", "fit3d_hf.cli", "demo", "--output_dir", str(run_dir), "--fresh"]
        if threads:
            command += ["--threads", str(threads)]
        env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
        self.checkout, self.run_dir = checkout, run_dir
        self.load_before = os.getloadavg()[0]
        self.competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.samples: list[tuple[float, float]] = []  # (wall clock, CPU seconds of the demo process)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while self.process.poll() is None:
            cpu = _cpu_seconds(self.process.pid)
            if cpu is not None:
                self.samples.append((time.perf_counter(), cpu))
            time.sleep(0.2)

    def finish(self) -> dict:
        """Wait for the run; its timings, CPU seconds per stage, lifting it/s, load and verdicts."""
        stdout, stderr = self.process.communicate()
        ended = time.perf_counter()
        if self.competitor is not None:
            self.competitor.kill()
            self.competitor.wait()
        self._sampler.join()
        if self.process.returncode:
            raise RuntimeError(f"fit3d demo in {self.checkout} failed:\n{stderr[-3000:]}")
        run_dir = self.run_dir
        timings = json.loads((run_dir / "timings.json").read_text())
        lifted = [json.loads(p.read_text()) for p in sorted((run_dir / "lifted").glob("*.json"))]
        threads_line = next((line for line in stdout.splitlines() if "threads" in line and "Wall time" in line), "")
        return {
            "timings": timings,
            "cpu_s": stage_cpu_seconds(timings, self.samples, ended),
            "wall_s": ended - self.started,
            "lift_it_per_s": [report["iterations_per_second"] for report in lifted],
            "load_before": self.load_before,
            "load_after": os.getloadavg()[0],
            "summary_line": threads_line.strip(),
            "verdicts": [line for line in (run_dir / "summary.md").read_text().splitlines() if line.startswith("- ")],
        }


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` and its worker processes (all threads), from /proc: its
    own, its ended children's (cutime, cstime) and its live descendants'; None once it is gone."""
    own, children, parents = {}, {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        process = int(stat.parent.name)
        parents[process] = int(fields[1])
        own[process] = int(fields[11]) + int(fields[12])
        children[process] = int(fields[13]) + int(fields[14])
    if pid not in own:
        return None
    tree, grown = {pid}, True
    while grown:
        grown = False
        for process, parent in parents.items():
            if parent in tree and process not in tree:
                tree.add(process)
                grown = True
    return (children[pid] + sum(own[process] for process in tree)) / os.sysconf("SC_CLK_TCK")


def stage_cpu_seconds(timings: dict, samples: list[tuple[float, float]], ended: float) -> dict[str, float]:
    """CPU seconds of each stage: the stages ran one after another for their `timings` seconds,
    ending about when the process did (only the summary follows `total_this_run`), so each one's
    interval of the sampled CPU clock is known. On a shared machine they move less with the load
    than wall-clock seconds do, but they still grow with it (cache and core sharing): compare
    runs made at the same time (`--together`), not CPU seconds of different days."""
    if len(samples) < 2:
        return {}
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]

    def cpu_at(t: float) -> float:
        i = bisect.bisect_left(walls, t)
        if i <= 0:
            return cpus[0]
        if i >= len(walls):
            return cpus[-1]
        w0, w1, c0, c1 = walls[i - 1], walls[i], cpus[i - 1], cpus[i]
        return c0 + (c1 - c0) * (t - w0) / (w1 - w0)

    start = min(ended, walls[-1] + 0.2) - timings.get("total_this_run", 0.0)
    result, t = {}, start
    for stage in STAGES:
        if stage in timings:
            result[stage] = cpu_at(t + timings[stage]) - cpu_at(t)
            t += timings[stage]
    result["process"] = cpus[-1]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to run the demo in")
    parser.add_argument("--busy", action="store_true", help="also run this checkout beside one CPU-bound process")
    parser.add_argument("--threads", type=int, default=0, help="--threads for every run (0: the demo's default)")
    parser.add_argument("--output_root", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    parser.add_argument(
        "--together",
        action="store_true",
        help="run this checkout and the baseline at the same time (both see the same load), then the busy run",
    )
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
        results = {}
        if args.together and "baseline" in runs:
            started = {name: DemoRun(runs[name][0], root / name, args.threads, False) for name in ("this", "baseline")}
            results = {name: run.finish() for name, run in started.items()}
        for name, (checkout, busy) in runs.items():
            if name not in results:
                results[name] = DemoRun(checkout, root / name.replace("+", "_"), args.threads, busy).finish()

    print(f"CPU: {info['cpu']}; vector extensions: {', '.join(info['vector_extensions']) or 'none found'}; {info['cores']} cores")
    print(f"--threads {args.threads or 'default'}; each run: `fit3d demo --fresh`, its default settings")
    for name, result in results.items():
        print(
            f"  {name}: load average {result['load_before']:.1f} before, {result['load_after']:.1f} after; {result['summary_line']}"
        )
    names = list(results)
    for title, key in (
        ("wall-clock seconds", "timings"),
        ("CPU seconds (user + system, all threads and worker processes)", "cpu_s"),
    ):
        print(f"\n{title}\n")
        header = "| stage | " + " | ".join(f"{n}" for n in names) + "".join(f" | {n} / this" for n in names[1:]) + " |"
        print(header)
        print("|---" * (2 * len(names)) + "|")
        rows = [*STAGES, "total_this_run" if key == "timings" else "process"]
        for stage in rows:
            values = [results[n][key].get(stage) for n in names]
            cells = [f"{v:.1f}" if v is not None else "—" for v in values]
            ratios = [f"{v / values[0]:.2f}" if v is not None and values[0] else "—" for v in values[1:]]
            print(f"| {stage} | " + " | ".join(cells) + "".join(f" | {r}" for r in ratios) + " |")
    for name in names:
        speeds = ", ".join(f"{v:.2f}" for v in results[name]["lift_it_per_s"])
        print(f"\n{name}: lifting it/s per room {speeds}")
        print("\n".join(results[name]["verdicts"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "threads": args.threads, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
