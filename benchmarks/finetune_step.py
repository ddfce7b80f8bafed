"""Cost of reading targets from the dataset, per fine-tuning step.

Times, on the same batch size and in the same run:
  bare       backbone forward + backward on a batch already in memory (loss = mean feature)
  bare+opt   the same plus gradient clipping and the AdamW step
  finetune   one full Stage II step: next batch from the saved targets dataset (PNG decode,
             float16 targets), joint flip, normalise, forward, masked L1, backward, clip, AdamW
and prints the medians and the ratio finetune / bare (target <= 1.10).

    python benchmarks/finetune_step.py                       # ViT-S/14 (random weights), 224x224, batch 2
    python benchmarks/finetune_step.py --height 434 --width 644 --steps 20   # ScanNet++-like grid 31x46
    python benchmarks/finetune_step.py --height 574 --width 868 --mixed_precision bf16 --steps 3  # GPU, bf16 autocast
"""

import argparse
import contextlib
import statistics
import tempfile
import time

import datasets
import numpy as np
import PIL.Image
import torch

from fit3d_hf import backbones
from fit3d_hf.finetune import FeatureMapHead, collate_targets, masked_l1, random_hflip
from fit3d_hf.targets import load_targets, schema, training_dataset


def write_random_targets(path: str, num_views: int, hidden_size: int, height: int, width: int, patch: int) -> None:
    grid = (height // patch, width // patch)
    rng = np.random.default_rng(0)

    def rows():
        for view in range(num_views):
            yield {
                "image": PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
                "target": rng.standard_normal((hidden_size, *grid)).astype(np.float16),
                "mask": (rng.random(grid) > 0.1).astype(np.uint8),
                "scene_id": "bench",
                "view_id": view,
                "intrinsics": np.eye(3, dtype=np.float32),
                "world_to_camera": np.eye(4, dtype=np.float32),
            }

    dataset = datasets.Dataset.from_generator(rows, features=schema(hidden_size, *grid), cache_dir=f"{path}.cache")
    dataset.save_to_disk(path)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dinov2_small", help="backbone preset (random weights)")
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--mixed_precision", choices=("no", "bf16"), default="no", help="bf16: forward under autocast (as accelerate's bf16)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    torch.manual_seed(0)
    backbone = backbones.build_backbone(backbones.preset_config(args.preset)).to(device).train()
    config = backbone.config
    patch, hidden_size = backbones.patch_size_of(config), backbones.hidden_size_of(config)
    height, width = args.height // patch * patch, args.width // patch * patch
    student = FeatureMapHead(backbone)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=1e-4, fused=True)  # as finetune()
    num_views = args.batch_size * (args.steps + 2)

    with tempfile.TemporaryDirectory() as tmp:
        write_random_targets(f"{tmp}/targets", num_views, hidden_size, height, width, patch)
        loader = torch.utils.data.DataLoader(
            training_dataset(load_targets(f"{tmp}/targets")), batch_size=args.batch_size, collate_fn=collate_targets
        )
        fixed = backbones.normalize(torch.rand(args.batch_size, 3, height, width, device=device), config)
        generator = torch.Generator().manual_seed(0)

        def autocast():
            if args.mixed_precision == "no":
                return contextlib.nullcontext()
            return torch.autocast(device.type, dtype=torch.bfloat16)

        def bare():
            with autocast():
                loss = student(fixed).float().mean()
            loss.backward()
            optimizer.zero_grad(set_to_none=True)

        def bare_opt():
            with autocast():
                loss = student(fixed).float().mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        batches = iter(loader)

        def finetune_step():
            batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            images, targets, masks = random_hflip(batch["images"], batch["targets"], batch["masks"], 0.5, generator)
            with autocast():
                output = student(backbones.normalize(images.float() / 255.0, config))
            loss = masked_l1(output.float(), targets.float(), masks.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 0.1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        # Interleave the variants so that drift in machine load hits them alike.
        times: dict[str, list[float]] = {"bare": [], "bare+opt": [], "finetune": []}
        for step in range(args.steps + 2):
            for name, fn in (("bare", bare), ("bare+opt", bare_opt), ("finetune", finetune_step)):
                seconds = timed(fn, device)
                if step >= 2:
                    times[name].append(seconds)

    medians = {name: statistics.median(values) for name, values in times.items()}
    grid = (height // patch, width // patch)
    print(
        f"\n{args.preset} (random weights), {height}x{width} -> grid {grid[0]}x{grid[1]}, Cb {hidden_size}, "
        f"batch {args.batch_size}, {device.type}, mixed precision {args.mixed_precision}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {args.threads} thread(s)")
        + f", median of {args.steps} steps\n"
    )
    print("| step | median s | vs bare |")
    print("|---|---|---|")
    for name, median in medians.items():
        print(f"| {name} | {median:.4f} | {median / medians['bare']:.3f} |")
    ratio = medians["finetune"] / medians["bare"]
    print(
        f"\nfinetune / bare = {ratio:.3f} (target <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'}); "
        f"finetune / bare+opt = {medians['finetune'] / medians['bare+opt']:.3f} (the cost of the targets alone)"
    )


if __name__ == "__main__":
    main()
