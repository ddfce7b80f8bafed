"""Do the demo's verdicts replicate? `run_demo` with many replications at a reduced scale, and the table.

Each replication has its own fine-tuning rooms, probe rooms and fine-tuning seed (`DemoConfig.replications`,
`fit3d_hf.pipeline.config.replication_config`); per comparison and headline metric the table gives the
mean over replications of the paired difference (a - b, each a mean over probe seeds), its 95% t
confidence interval, the t-test and exact sign-test p-values, n, and the verdict (better/WORSE only
when the interval excludes 0). Writes benchmarks/results/<name>.md and .json with the machine (CPU
model and vector flags, threads, load average before and after), the date and every setting. The run
folder resumes: rerunning the same command skips finished replications.

    OMP_NUM_THREADS=1 python benchmarks/replications.py                      # 10 replications at the SCALE below
    OMP_NUM_THREADS=1 python benchmarks/replications.py --name replications_lr3e-4 \\
        --output_dir /tmp/fit3d-replications-lr3e-4 --learning_rate 3e-4 \\
        --reuse_from /tmp/fit3d-replications                                   # any DemoConfig flag overrides SCALE

The SCALE is smaller than the demo's defaults so that 10 replications fit in about 45 minutes on one
thread of a shared 2-core machine; the flags of `fit3d demo` override it.
"""

import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.pipeline import DemoConfig, run_demo
from fit3d_hf.pipeline.config import replication_configs, stage_settings
from fit3d_hf.pipeline.report import replication_table
from fit3d_hf.pipeline.rerun import RECORD_FILE, prepare_run_folder, read_record
from fit3d_hf.threads import configure_threads

RESULTS = Path(__file__).parent / "results"
SCALE = dict(
    output_dir="/tmp/fit3d-replications",
    replications=10,
    num_train_scenes=2,
    num_probe_train_scenes=2,
    num_test_scenes=1,
    scene_views=8,
    scene_height=96,
    scene_width=128,
    lift_iterations=100,
    lift_max_gaussians=4_000,
    lift_init_points=2_000,
    finetune_steps=60,
    # The demo's default before it became 3e-4; the recorded results (benchmarks/results/replications.md) used it.
    learning_rate=1e-4,
    finetune_batch_size=4,
    probe_seeds=[0],
    seg_iterations=150,
    depth_iterations=75,
    probe_height=96,
    probe_width=128,
)
CPU_FLAGS = ("avx", "avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
# What the stages before fine-tuning write: a setting that changes only later stages (the learning rate, the
# probes) can start from another run's rooms, lifted Gaussians and targets.
REUSABLE = {"scenes": ("scenes.json",), "lift": ("lifted",), "render": ("targets", "targets_blur")}


@dataclass
class BenchmarkArguments:
    name: str = field(default="replications", metadata={"help": "Stem of the result files in benchmarks/results/."})
    threads: int = field(default=1, metadata={"help": "torch threads of this process (fit3d_hf.threads)."})
    reuse_from: str | None = field(
        default=None,
        metadata={
            "help": "Another run folder of this benchmark: each replication's scenes/lift/render stages made with "
            "the same settings are copied from it instead of run again (the demo's stages are deterministic)."
        },
    )


def reuse_stages(config: DemoConfig, source: Path) -> list[str]:
    """Copy into each replication of `config` the stages of `source`'s replication made with the same settings.

    Returns:
        The stages copied, as "<replication folder>/<stage>".
    """
    _, backbone_name = load_backbone_spec(config.backbone, config.seed)
    copied = []
    for index, replication in enumerate(replication_configs(config)):
        relative = Path(replication.output_dir).relative_to(config.output_dir)
        source_dir, target_dir = source / relative, Path(replication.output_dir)
        if not (source_dir / RECORD_FILE).exists():
            continue
        done = read_record(source_dir)["stages"]
        run_dir = prepare_run_folder(replication if index else config)
        record = read_record(run_dir)
        for stage, artifacts in REUSABLE.items():
            previous = done.get(stage)
            settings = json.loads(json.dumps(stage_settings(replication, stage, backbone_name)))
            if stage in record["stages"] or not previous or not previous["complete"] or previous["settings"] != settings:
                break
            for artifact in artifacts:
                copy = shutil.copytree if (source_dir / artifact).is_dir() else shutil.copy2
                copy(source_dir / artifact, target_dir / artifact)
            record["stages"][stage] = previous
            (run_dir / RECORD_FILE).write_text(json.dumps(record))
            copied.append(f"{relative}/{stage}")
    return copied


def machine() -> dict:
    """CPU model, the vector flags torch's kernels care about, threads and load average."""
    model, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    return {
        "cpu": model,
        "cpu_flags": sorted(flags & set(CPU_FLAGS)),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((DemoConfig, BenchmarkArguments))
    parser.set_defaults(**SCALE)
    config, args = parser.parse_args_into_dataclasses(argv)
    configure_threads(args.threads)
    copied = reuse_stages(config, Path(args.reuse_from)) if args.reuse_from else []
    load_before, started = os.getloadavg(), time.perf_counter()
    result = run_demo(config)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    record = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/replications.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "wall_seconds_this_run": seconds,
        "settings": {k: v for k, v in asdict(config).items() if k not in ("fresh",)},
        "timings": result.timings,
        "stages_copied_from": {"run": args.reuse_from, "stages": copied} if copied else None,
        **result.replications,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    m = record["machine"]
    changed = {k: v for k, v in record["settings"].items() if getattr(DemoConfig(), k) != v and k != "output_dir"}
    lines = [
        f"# Demo verdicts across {result.replications['n']} replications — {record['date']}",
        "",
        f"`{record['command']}`",
        "",
        f"Settings other than `fit3d demo`'s defaults: {', '.join(f'{k}={v}' for k, v in changed.items())}.",
        f"Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cpus']} logical CPUs shared with other jobs; "
        f"torch {m['torch']} with {m['torch_threads']} thread(s), OMP_NUM_THREADS={m['OMP_NUM_THREADS']}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; {seconds / 60:.1f} min for the stages this run did"
        + (
            f" ({len(copied)} scenes/lift/render stages made with the same settings were copied from {args.reuse_from})."
            if copied
            else "."
        ),
        "",
        f"Each replication: its own fine-tuning rooms, probe rooms and seed. {result.replications['test']}; "
        "verdict better/WORSE only when the CI excludes 0. a − b is the per-replication difference of the means "
        "(over probe seeds; over test rooms for correspondence), so > 0 is better for mIoU and recall, < 0 for depth RMSE.",
        "",
        replication_table(result.replications["comparisons"]),
        "",
        "Per-replication differences (replication 0, 1, ...):",
        "",
        *(
            f"- {c['a']} − {c['b']}, {c['label']}: " + ", ".join(f"{d:+.4f}" for d in c["differences"])
            for c in result.replications["comparisons"]
        ),
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
