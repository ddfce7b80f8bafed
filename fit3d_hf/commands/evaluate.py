"""`fit3d evaluate` / `accelerate launch recipes/evaluate.py`: the linear-probe benchmark."""

import copy
from dataclasses import dataclass, field

from fit3d_hf.commands import parse_args
from fit3d_hf.probes.benchmark import BenchmarkConfig

DESCRIPTION = """Linear-probe benchmark: original vs FiT3D features, with controls.

Trains segmentation and depth linear probes (DINOv2 protocol) on frozen features of every
source over several seeds, tests them on unseen images, measures multi-view patch
correspondence recall on scenes with depth and cameras, and writes <output_dir>/results.json
(with the protocol) and results.md ("baseline vs FiT3D", controls beside them, differences
smaller than the seed spread marked ≈).

Sources, from --model (a FiT3DModel folder):
  original        the frozen original backbone (or --baseline)       role: baseline
  fit3d           the FiT3DModel as its config.assembly says          role: fit3d
  finetuned_only  the fine-tuned backbone alone, same width (--controls)
  concat_random   [original, a random-init backbone of the same size] (--controls)
  blur_control    the fine-tuned backbone of --blur_control, a FiT3DModel fine-tuned on
                  single-view (blurred) targets instead of lifted ones
Datasets: --dataset synthetic (procedural rooms; probes train on --num_train_scenes rooms and
test on --num_test_scenes unseen ones), a paper set (scannetpp, scannet, nyuv2, ade20k,
voc2012, kitti) under --data_root, or --dataset hf with a folder saved by `datasets`.

CPU, minutes:  fit3d evaluate --config recipes/configs/evaluate_synthetic_cpu.yaml --model fit3d-model
Paper:         accelerate launch recipes/evaluate.py --config recipes/configs/evaluate_paper.yaml \\
                   --model fit3d-model --dataset nyuv2 --data_root data/nyu
Features and finished probe runs are cached in <output_dir>/cache: rerun the same command to resume.
"""


@dataclass
class EvaluateArguments:
    output_dir: str = field(metadata={"help": "Where results.json, results.md and the cache go."})
    model: str = field(metadata={"help": "A FiT3DModel folder (from `fit3d finetune`) or Hub id."})
    baseline: str | None = field(
        default=None,
        metadata={
            "help": "Baseline backbone, named as for `fit3d lift --backbone` ('embedded', a folder or Hub id); default: the model's original backbone."
        },
    )
    blur_control: str | None = field(
        default=None, metadata={"help": "A FiT3DModel fine-tuned on single-view blurred targets (control ii)."}
    )
    controls: bool = field(default=True, metadata={"help": "Add finetuned_only and concat_random controls."})
    control_seed: int = field(default=1234, metadata={"help": "Seed of the random-init backbone of concat_random."})
    dataset: str = field(
        default="synthetic", metadata={"help": "synthetic, scannetpp, scannet, nyuv2, ade20k, voc2012, kitti, or hf."}
    )
    data_root: str | None = field(default=None, metadata={"help": "Root of a paper dataset in its standard layout."})
    num_train_scenes: int = field(default=6, metadata={"help": "synthetic: rooms the probes train on."})
    num_test_scenes: int = field(default=2, metadata={"help": "synthetic: unseen rooms the probes are tested on."})
    scene_seed: int = field(
        default=1000, metadata={"help": "synthetic: seed of the first room (fine-tuning rooms use 0, 1, ...)."}
    )
    scene_views: int = field(default=24, metadata={"help": "synthetic: views per room."})
    scene_height: int = field(default=120, metadata={"help": "synthetic: image height."})
    scene_width: int = field(default=160, metadata={"help": "synthetic: image width."})
    correspondence_scenes: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Scene folders with depth (`fit3d_hf.scenes.load_scene`) on which to measure correspondence recall too."
        },
    )
    hf_dataset: str | None = field(default=None, metadata={"help": "hf: a folder written by Dataset/DatasetDict.save_to_disk."})
    hf_train_split: str = field(default="train", metadata={"help": "hf: training split."})
    hf_test_split: str = field(default="test", metadata={"help": "hf: test split."})
    image_column: str = field(default="image", metadata={"help": "hf: image column."})
    semantics_column: str | None = field(default=None, metadata={"help": "hf: label-map column (255 = ignore)."})
    depth_column: str | None = field(default=None, metadata={"help": "hf: depth-map column."})
    num_labels: int | None = field(default=None, metadata={"help": "hf: number of classes."})
    max_depth: float | None = field(default=None, metadata={"help": "hf: max depth in metres."})
    depth_scale: float = field(default=1.0, metadata={"help": "hf: stored depth / depth_scale = metres."})


def build_sources(args: EvaluateArguments) -> tuple[dict, dict, dict]:
    """(sources, roles, descriptions) from the arguments."""
    import torch

    from fit3d_hf import FiT3DModel, backbones
    from fit3d_hf.backbone_specs import load_backbone_spec

    model = FiT3DModel.from_pretrained(args.model)
    original, baseline_name = load_backbone_spec(args.baseline, args.control_seed) if args.baseline else (model.original, None)
    sources = {"original": original, "fit3d": model}
    roles = {"original": "baseline", "fit3d": "fit3d"}
    descriptions = {
        "original": f"baseline backbone ({baseline_name or 'the original backbone of ' + args.model})",
        "fit3d": f"{args.model}, assembly {model.config.assembly}",
    }
    if args.controls:
        torch.manual_seed(args.control_seed)
        random_backbone = backbones.build_backbone(copy.deepcopy(model.config.backbone_config))
        sources["finetuned_only"] = model.finetuned
        sources["concat_random"] = [original, random_backbone]
        descriptions["finetuned_only"] = "control: the fine-tuned backbone alone (same width as the baseline)"
        descriptions["concat_random"] = f"control: [original, random-init backbone of the same size (seed {args.control_seed})]"
    if args.blur_control:
        sources["blur_control"] = FiT3DModel.from_pretrained(args.blur_control).finetuned
        descriptions["blur_control"] = f"control: fine-tuned on single-view blurred targets ({args.blur_control}), alone"
    for name in sources:
        roles.setdefault(name, "control")
    return sources, roles, descriptions


def run(args: EvaluateArguments, config: BenchmarkConfig) -> dict:
    """Build the sources and data the arguments name, run the benchmark, write the report."""
    import os

    import torch
    from accelerate import Accelerator
    from datasets import load_from_disk

    from fit3d_hf.probes import benchmark, datasets

    if config.cache_dir is None:
        config.cache_dir = os.path.join(args.output_dir, "cache")
    sources, roles, descriptions = build_sources(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    kwargs = dict(roles=roles, descriptions=descriptions, accelerator=accelerator)
    loaded = []
    if args.correspondence_scenes:
        from fit3d_hf.scenes import load_scene

        loaded = [load_scene(path) for path in args.correspondence_scenes]
        kwargs["correspondence_scenes"] = loaded
    if args.dataset == "synthetic":
        from fit3d_hf.scenes import synthetic

        size = dict(num_views=args.scene_views, height=args.scene_height, width=args.scene_width)
        train = synthetic.make_rooms(args.num_train_scenes, seed=args.scene_seed, **size)
        test = synthetic.make_rooms(args.num_test_scenes, seed=args.scene_seed + args.num_train_scenes, **size)
        kwargs["correspondence_scenes"] = test + loaded
        results = benchmark.benchmark_on_scenes(sources, train, test, config, **kwargs)
    elif args.dataset == "hf":
        if args.hf_dataset is None:
            raise SystemExit("fit3d evaluate: --dataset hf needs --hf_dataset FOLDER")
        data = load_from_disk(args.hf_dataset)
        columns = dict(
            image_column=args.image_column,
            semantics_column=args.semantics_column,
            depth_column=args.depth_column,
            num_labels=args.num_labels,
            max_depth=args.max_depth,
            depth_scale=args.depth_scale,
        )
        name = os.path.basename(os.path.normpath(args.hf_dataset))
        train = datasets.from_hf_dataset(data[args.hf_train_split], name=name, **columns)
        test = datasets.from_hf_dataset(data[args.hf_test_split], name=name, **columns)
        results = benchmark.run_benchmark(sources, train, test, config, **kwargs)
    else:
        if args.data_root is None:
            raise SystemExit(f"fit3d evaluate: --dataset {args.dataset} needs --data_root")
        tasks = [
            t for t in ("segmentation", "depth") if t in config.tasks and t in datasets.PAPER_DATASETS.get(args.dataset, {t: 0})
        ]
        results = None
        for task in tasks:
            train = datasets.load_eval_dataset(args.dataset, args.data_root, "train", task)
            test = datasets.load_eval_dataset(args.dataset, args.data_root, "test", task)
            part = benchmark.run_benchmark(sources, train, test, config, **kwargs)
            kwargs.pop("correspondence_scenes", None)  # measured once, with the first task
            if results is None:
                results = part
            else:
                results["results"] += part["results"]
        if results is None:
            raise SystemExit(f"fit3d evaluate: {args.dataset} has none of the tasks {config.tasks}")
    if accelerator.is_main_process:
        json_path, md_path = benchmark.write_report(results, args.output_dir)
        print(open(md_path).read())
        print(f"wrote {json_path} and {md_path}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_args((EvaluateArguments, BenchmarkConfig), argv, prog="fit3d evaluate", description=DESCRIPTION)
    return run(args, config)
