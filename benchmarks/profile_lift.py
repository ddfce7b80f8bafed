"""Where a lifting step's time goes at the demo's settings: torch.profiler's table of operators.

Lifts procedural room 0 (16 views, 160×120) with the embedded backbone and the demo's lifting
settings (`LiftConfig.cpu_preset`, 4k initial and at most 8k Gaussians, D = 64, the decoder to the
backbone's 128 channels) under `torch.profiler` and prints the operators by self CPU time. The
rasterizer shows as `_Composite` (forward) and `_CompositeBackward` (their totals include the
operators they call); the decoder and SSIM as convolutions.

    OMP_NUM_THREADS=1 python benchmarks/profile_lift.py --steps 60
"""

import argparse
import tempfile
import time

import fit3d_hf  # noqa: F401  (first: the thread policy's OpenMP setting must precede torch)

# isort: split
import torch
from torch.profiler import ProfilerActivity, profile

from fit3d_hf.backbone_specs import load_backbone_spec
from fit3d_hf.lift import LiftConfig, lift_scene
from fit3d_hf.scenes.synthetic import make_room


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="lifting steps to profile")
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scene = make_room(0, num_views=16, height=120, width=160)
    backbone, _ = load_backbone_spec("embedded", 0)
    config = LiftConfig.cpu_preset(iterations=args.steps, max_gaussians=8000, init_points=4000, checkpoint_every=args.steps)
    with tempfile.TemporaryDirectory() as out, profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        lift_scene(scene, backbone, config, output_dir=out, progress=False)
        wall = time.perf_counter() - started
    print(f"{args.steps} steps, {torch.get_num_threads()} threads, {wall:.1f} s wall under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
