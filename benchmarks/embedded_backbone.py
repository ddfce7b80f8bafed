"""Random-init vs SimMIM-pretrained embedded backbone, through the package's probe benchmark.

Both were measured before choosing what the demo ships (docs/design.md). The frozen features of each
candidate go through `fit3d_hf.evaluation.benchmark_on_scenes` with the synthetic CPU preset (96×128 input):
segmentation and depth linear probes trained on `--probe_train_scenes` rooms and tested on
`--test_scenes` unseen rooms over several probe seeds, plus multi-view correspondence recall.
The random candidate has the shipped architecture (seed 0).

    python benchmarks/embedded_backbone.py --candidates fit3d_hf/assets/embedded_backbone

Writes `results.json` / `results.md` into `--output_dir` and prints the table.
"""

from dataclasses import dataclass, field

import torch

from fit3d_hf.backbones import build_backbone
from fit3d_hf.commands import parse_args
from fit3d_hf.embedded import EmbeddedPretrainConfig, embedded_backbone_config, load_embedded_backbone
from fit3d_hf.evaluation import BenchmarkConfig, benchmark_on_scenes, write_report
from fit3d_hf.scenes.synthetic import make_rooms


@dataclass
class EmbeddedBenchmarkArguments:
    candidates: list[str] = field(
        default_factory=list, metadata={"help": "Saved backbone folders to compare with a random-init one."}
    )
    probe_train_scenes: int = field(default=4, metadata={"help": "Rooms whose views train the probes (seeds 500, 501, ...)."})
    test_scenes: int = field(default=2, metadata={"help": "Unseen rooms the probes are tested on (seeds 600, 601, ...)."})
    views: int = field(default=12, metadata={"help": "Views per room."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Probe seeds."})
    iterations: int = field(default=400, metadata={"help": "Steps of each segmentation and depth probe (CPU preset otherwise)."})
    output_dir: str = field(
        default="benchmarks/results/embedded_backbone", metadata={"help": "Where results.json and results.md go."}
    )


def main(argv: list[str] | None = None) -> None:
    (args,) = parse_args((EmbeddedBenchmarkArguments,), argv, prog="benchmarks/embedded_backbone.py", description=__doc__)
    config = BenchmarkConfig.cpu_preset(seeds=args.seeds, seg_iterations=args.iterations, depth_iterations=args.iterations)
    torch.manual_seed(0)
    sources = {"random-init": build_backbone(embedded_backbone_config(EmbeddedPretrainConfig())).eval()}
    descriptions = {"random-init": "the embedded architecture with random weights (seed 0)"}
    for path in args.candidates:
        sources[path] = load_embedded_backbone(path)
        descriptions[path] = f"pre-trained weights from {path}"
    train = make_rooms(args.probe_train_scenes, seed=500, num_views=args.views)
    test = make_rooms(args.test_scenes, seed=600, num_views=args.views)
    roles = {name: "baseline" if i == 0 else "control" for i, name in enumerate(sources)}
    results = benchmark_on_scenes(sources, train, test, config, roles=roles, descriptions=descriptions)
    _, md_path = write_report(results, args.output_dir)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
