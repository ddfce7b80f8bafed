"""Memory and time of one FiT3D fine-tuning step per backbone preset: measured for the small ones, estimated for the rest.

A step is what `fit3d_hf.finetune.finetune` runs: a FiT3DModel built from the backbone
(`FiT3DModel.from_backbone`; the caller's backbone, the frozen original and the trained copy are
all in memory), the trained copy's forward on a batch of images, the masked L1 against float16
targets, backward, gradient clipping and a fused AdamW step, in float32. Random weights.

Measured presets (at most `--measure_max_params` parameters) run in their own process each: the
median step time after one warm-up step, and the peak resident memory (ru_maxrss) of that process.
The others are estimated from the measured ones:
  time   = FLOPs of the step x the median seconds per FLOP of the measured presets,
           FLOPs = 3 x forward (backward ~ 2 x forward), forward = 2 x tokens x (weights of the blocks'
           linear layers) + 4 x layers x tokens^2 x width (attention scores and their use);
  memory = the runtime + model state
           (weights x 3 copies + gradients + 2 AdamW moments = 24 bytes per parameter of one copy)
           + activations (bytes per batch x token x width x layer); runtime and bytes per unit are the
           least-squares line through the measured presets' peak minus model state.

    python benchmarks/backbone_sizes.py                       # every preset, 224x224, batch 2, 1 thread
    python benchmarks/backbone_sizes.py --presets dinov3_small dinov3_large --steps 5
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

import torch

BYTES_PER_PARAMETER = 4 * 6  # float32: caller's backbone + original + trained copy, its gradient, 2 AdamW moments


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def describe(preset: str, height: int, width: int, batch: int) -> dict:
    """Parameters, tokens and FLOPs of a step, from a model built on the meta device (no memory)."""
    from fit3d_hf import backbones

    config = backbones.preset_config(preset)
    with torch.device("meta"):
        model = backbones.build_backbone(config)
    patch = backbones.patch_size_of(config)
    tokens = backbones.num_prefix_tokens_of(config) + (height // patch) * (width // patch)
    blocks = re.compile(r"(^|\.)layers?\.\d+\.")
    linear = sum(p.numel() for n, p in model.named_parameters() if blocks.search(n) and p.ndim == 2)
    hidden, layers = backbones.hidden_size_of(config), config.num_hidden_layers
    forward = batch * (2 * tokens * linear + 4 * layers * tokens**2 * hidden)
    return dict(
        preset=preset,
        family=backbones.family_of(config),
        parameters=sum(p.numel() for p in model.parameters()),
        tokens=tokens,
        hidden_size=hidden,
        layers=layers,
        step_flops=3 * forward,
        activation_units=batch * tokens * hidden * layers,
    )


def measure(preset: str, height: int, width: int, batch: int, steps: int, threads: int) -> dict:
    """One preset's step time and peak memory, in this process."""
    from fit3d_hf import FiT3DModel, backbones
    from fit3d_hf.finetune import FeatureMapHead, masked_l1

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = backbones.build_backbone(backbones.preset_config(preset))
    model = FiT3DModel.from_backbone(backbone).train()
    student = FeatureMapHead(model.finetuned)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=1e-4, fused=True)  # as finetune()
    patch = backbones.patch_size_of(backbone.config)
    height, width = height // patch * patch, width // patch * patch
    grid = (height // patch, width // patch)
    images = backbones.normalize(torch.rand(batch, 3, height, width), backbone.config)
    targets = torch.randn(batch, backbones.hidden_size_of(backbone.config), *grid).half()
    masks = torch.ones(batch, *grid)
    seconds = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = masked_l1(student(images), targets.float(), masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the AdamW state
            seconds.append(time.perf_counter() - start)
    return dict(step_seconds=statistics.median(seconds), peak_rss_bytes=_peak_rss_bytes())


def main() -> None:
    from fit3d_hf import backbones
    from fit3d_hf.io import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=sorted(backbones.PRESETS))
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=2, help="views per step (the paper's)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measured preset (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--measure_max_params", type=float, default=1.0e8, help="measure presets up to this size")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one preset, in a child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.height, args.width, args.batch_size, args.steps, args.threads)))
        return

    rows = [describe(preset, args.height, args.width, args.batch_size) for preset in args.presets]
    for row in rows:
        if row["parameters"] <= args.measure_max_params:
            child = [sys.executable, __file__, "--measure", row["preset"], "--height", str(args.height), "--width",
                     str(args.width), "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--threads",
                     str(args.threads)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            result = subprocess.run(child, capture_output=True, text=True, env=env, check=True)
            row.update(json.loads(result.stdout.strip().splitlines()[-1]), how="measured")
            print(
                f"measured {row['preset']}: {row['step_seconds']:.2f} s/step, {row['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True
            )

    measured = [row for row in rows if row.get("how") == "measured"]
    if not measured:
        raise SystemExit("nothing measured: raise --measure_max_params")
    seconds_per_flop = statistics.median(row["step_seconds"] / row["step_flops"] for row in measured)
    # Memory beyond the model state = runtime + bytes per activation unit x units: a least-squares line.
    units = [row["activation_units"] for row in measured]
    rest = [row["peak_rss_bytes"] - BYTES_PER_PARAMETER * row["parameters"] for row in measured]
    if len(set(units)) > 1:
        bytes_per_unit, runtime = statistics.linear_regression(units, rest)
    else:
        bytes_per_unit, runtime = 0.0, rest[0]
    for row in rows:
        if row.get("how") != "measured":
            row.update(
                how="estimated",
                step_seconds=row["step_flops"] * seconds_per_flop,
                peak_rss_bytes=runtime + BYTES_PER_PARAMETER * row["parameters"] + bytes_per_unit * row["activation_units"],
            )

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()
    )
    print(
        f"\nFiT3D fine-tuning step, {args.height}x{args.width}, batch {args.batch_size}, float32, random weights; "
        f"{cpu}, {args.threads} thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"estimates: {seconds_per_flop * 1e9:.3f} s per GFLOP, runtime {runtime / 2**30:.2f} GiB, {bytes_per_unit:.1f} B per activation unit\n"
    )
    print("| preset | family | parameters | tokens | GFLOP/step | s/step | peak memory GiB | how |")
    print("|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["family"], r["parameters"])):
        print(
            f"| {row['preset']} | {row['family']} | {row['parameters'] / 1e6:.1f} M | {row['tokens']} | "
            f"{row['step_flops'] / 1e9:.0f} | {row['step_seconds']:.2f} | {row['peak_rss_bytes'] / 2**30:.2f} | {row['how']} |"
        )
    if args.output:
        record = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, load_average_at_end=os.getloadavg()[0])
        atomic_write_json(args.output, dict(record, args=vars(args), cpu=cpu, rows=rows))


if __name__ == "__main__":
    main()
