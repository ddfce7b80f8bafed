"""`fit3d evaluate` / `accelerate launch recipes/evaluation.py`: the linear-probe benchmark (`fit3d_hf.evaluation.evaluate`)."""

from fit3d_hf.commands import parse_args
from fit3d_hf.evaluation import BenchmarkConfig, EvaluationArguments, evaluate

DESCRIPTION = """Linear-probe benchmark: original vs FiT3D features, with controls.

Trains segmentation and depth linear probes (DINOv2 protocol) on frozen features of every
source over several seeds, tests them on unseen images, measures multi-view patch
correspondence recall on scenes with depth and cameras, and writes <output_dir>/results.json
(with the protocol) and results.md ("baseline vs FiT3D", controls beside them, differences
smaller than the seed spread marked ≈).

Protocols (--protocol):
  paper  (default) the official probes of the paper datasets: each dataset's augmented
         training crops, features computed every step, sliding-window (segmentation) or
         flip-averaged (depth) test, the official losses and optimisation (docs/protocol.md)
  fixed  features once per image at --image_height x --image_width, no augmentation,
         whole-image test: fast, for synthetic rooms and `datasets` folders; not the paper's

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
Paper:         accelerate launch recipes/evaluation.py --config recipes/configs/evaluate_paper.yaml \\
                   --model fit3d-model --dataset scannetpp --data_root eval_data/scannetpp
Finished probe runs (and the fixed protocol's features) are cached in <output_dir>/cache: rerun
the same command to resume.
"""


def main(argv: list[str] | None = None) -> dict:
    args, config = parse_args((EvaluationArguments, BenchmarkConfig), argv, prog="fit3d evaluate", description=DESCRIPTION)
    return evaluate(args, config)
