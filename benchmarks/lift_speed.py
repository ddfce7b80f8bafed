"""Lifting iterations per second at the demo's settings, and the same run of another checkout.

Lifts one procedural room (`make_room(0)`, 16 views) with the embedded backbone and the demo's
lifting settings (`LiftConfig.cpu_preset` with 8k Gaussians at most, 4k initial, D = 64, the
decoder to the backbone's 128 channels) and reports the training iterations per second from the
lifting report, the process's CPU seconds and the held-out PSNR. Each run is a fresh process.

With `--baseline PATH` (a checkout of another revision, e.g. `git worktree add /tmp/old 2566e3d`)
the same lift runs in that checkout too, alternating with this one `--repeats` times, so that both
see the same load; the table gives the median of each and their ratio. The machine line records
the CPU model, its vector extensions, the core count, the threads and the load average.

    python benchmarks/lift_speed.py                                   # this checkout, demo settings
    python benchmarks/lift_speed.py --baseline /tmp/old --steps 100 --repeats 3
    python benchmarks/lift_speed.py --device cuda --backend gsplat --height 584 --width 876 \\
        --init_points 100000 --max_gaussians 150000 --steps 300       # a ScanNet++-sized room on a GPU
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """CPU model, vector extensions, cores and load: what every timing is quoted with."""
    info = {"cpu": "unknown", "vector_extensions": [], "cores": os.cpu_count(), "load_average": os.getloadavg()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["cpu"] == "unknown":
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile")
            info["vector_extensions"] = [flag for flag in wanted if flag in flags]
            break
    return info


def child(args: argparse.Namespace) -> None:
    """One lift in this process; prints one JSON line."""
    # First: importing fit3d_hf sets the checkout's OpenMP policy, which must precede torch.
    import fit3d_hf  # noqa: F401

    # isort: split
    import torch

    try:
        from fit3d_hf.lift import LiftConfig, lift_scene
    except ImportError:  # checkouts before the lift package (e.g. 2566e3d) kept it in splatting.lift
        from fit3d_hf.splatting.lift import LiftConfig, lift_scene
    from fit3d_hf.embedded import load_embedded_backbone
    from fit3d_hf.scenes.synthetic import make_room

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbone = load_embedded_backbone().to(device).requires_grad_(False).eval()
    scene = make_room(0, num_views=args.views, height=args.height, width=args.width)
    config = LiftConfig.cpu_preset(
        iterations=args.steps,
        max_gaussians=args.max_gaussians,
        init_points=args.init_points,
        feature_dim=args.feature_dim,
        backend=args.backend,
        checkpoint_every=args.steps,
    )
    # CPU time of the steps after the first (the callback runs after each step): on a shared
    # machine it moves less with the load than wall-clock time.
    marks = {}

    def callback(step, params):
        marks.setdefault("first", time.process_time())
        marks["last"] = time.process_time()

    cpu, wall = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        lift_scene(scene, backbone, config, output_dir=out, progress=False, callback=callback)
        report = json.loads((Path(out) / f"{scene.scene_id}.json").read_text())
    print(
        json.dumps(
            {
                "it_per_s": report["iterations_per_second"],
                "train_s": report["timings_s"]["train"],
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "step_cpu_ms": (marks["last"] - marks["first"]) / max(1, args.steps - 1) * 1000,
                "psnr": report["metrics"]["psnr"],
                "gaussians": report["num_gaussians"],
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            }
        )
    )


def run(checkout: Path, argv: list[str]) -> dict:
    """One lift in a fresh process importing fit3d_hf from `checkout`."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *argv],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"lift in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to run the same lift in")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each checkout (alternating)")
    parser.add_argument("--steps", type=int, default=300, help="lifting steps (the demo: 300)")
    parser.add_argument("--views", type=int, default=16)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--max_gaussians", type=int, default=8000)
    parser.add_argument("--init_points", type=int, default=4000)
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto", help="rasterizer: auto, torch or gsplat")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the checkout's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    passed = [a for a in sys.argv[1:] if a not in ("--child",)]
    forwarded = []
    skip = False
    for a in passed:  # --baseline, --repeats and --json stay here
        if skip:
            skip = False
            continue
        if a in ("--baseline", "--repeats", "--json"):
            skip = True
            continue
        if a.startswith(("--baseline=", "--repeats=", "--json=")):
            continue
        forwarded.append(a)
    checkouts = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    before = machine()
    results: dict[str, list[dict]] = {name: [] for name in checkouts}
    for repeat in range(args.repeats):
        names = list(checkouts) if repeat % 2 == 0 else list(reversed(checkouts))
        for name in names:
            results[name].append(run(checkouts[name], forwarded))
    after = machine()
    print(
        f"CPU: {before['cpu']}; vector extensions: {', '.join(before['vector_extensions']) or 'none found'}; {before['cores']} cores"
    )
    print(
        f"load average before {before['load_average'][0]:.1f}, after {after['load_average'][0]:.1f}; "
        f"{args.height}x{args.width}, {args.steps} steps, <= {args.max_gaussians} Gaussians, D = {args.feature_dim}, "
        f"device {args.device}, backend {args.backend}"
    )
    print(
        f"{'checkout':10s} {'threads':>7s} {'it/s':>7s} {'train s':>8s} {'CPU s':>7s} {'CPU ms/step':>11s} {'PSNR':>6s}"
        "  OMP_WAIT_POLICY"
    )
    medians, step_cpu = {}, {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["it_per_s"] for r in runs)
        step_cpu[name] = statistics.median(r["step_cpu_ms"] for r in runs)
        train = statistics.median(r["train_s"] for r in runs)
        cpu = statistics.median(r["cpu_s"] for r in runs)
        psnr = statistics.median(r["psnr"] for r in runs)
        print(
            f"{name:10s} {runs[0]['threads']:7d} {medians[name]:7.2f} {train:8.1f} {cpu:7.1f} {step_cpu[name]:11.1f} "
            f"{psnr:6.2f}  {runs[0]['omp_wait_policy']}"
        )
    if "baseline" in medians:
        print(
            f"speed-up, this / baseline (medians of {args.repeats}): {medians['this'] / medians['baseline']:.2f}x in it/s, "
            f"{step_cpu['baseline'] / step_cpu['this']:.2f}x in CPU time per step"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine_before": before,
                    "machine_after": after,
                    "args": vars(args) | {"baseline": str(args.baseline), "json": str(args.json)},
                    "runs": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
