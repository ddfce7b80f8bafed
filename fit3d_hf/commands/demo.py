"""`fit3d demo`: the whole FiT3D pipeline on procedural rooms, on a CPU, in minutes (`fit3d_hf.pipeline`)."""

from fit3d_hf.commands import parse_args
from fit3d_hf.pipeline import DemoConfig, DemoError, DemoResult, run_demo

DESCRIPTION = """Run the whole FiT3D pipeline on synthetic rooms and show what it achieved.

Stages (each writes its artifact into --output_dir atomically; a rerun skips a stage that is
complete with the same settings, resumes an interrupted one, and refuses one made with other
settings; --fresh starts over):
  1 scenes    procedural rooms: fine-tuning rooms (seeds scene_seed..), probe rooms (probe_scene_seed..)
  2 lift      Stage I: lift the backbone's features of each fine-tuning room into feature Gaussians
  3 render    the lifted targets dataset, and the single-view blurred-target control dataset
  4 finetune  Stage II on the lifted targets (the FiT3D model) and on the blurred ones (the control)
  5 evaluate  linear probes (segmentation, depth) and 3D correspondence on unseen rooms for:
              original | FiT3D concat | fine-tuned alone | blur-target control | concat with a random ViT
  (1-5 run once per replication: --replications N runs N, each with its own rooms and seed, the
  first in --output_dir, replication k in --output_dir/replications/k)
  6 pictures  PCA / k-means of original vs FiT3D features, loss curves (PNG)
  7 replicate the verdicts across replications: mean difference, 95% t interval, t-test and sign
              test; better/WORSE only when the interval excludes 0 (none with one replication)
  8 card      the FiT3DModel folder gets a model card with the results and those verdicts
  9 summary   the results table, the verdicts, paths

--backbone embedded (default) is the package's own small ViT, pre-trained on synthetic rooms (see
fit3d_hf/embedded.py); --backbone facebook/dinov2-small or a local folder runs a real model where
it is available (no download happens here when HF_HUB_OFFLINE=1).

  fit3d demo                                   # about 3 minutes on 2 idle CPU cores
  fit3d demo --backbone /models/dinov2-small   # a real backbone (slower)
  fit3d demo --replications 3                  # verdicts across 3 replications (3x the time)
  fit3d demo --fresh                           # start over
"""


def main(argv: list[str] | None = None) -> DemoResult:
    (config,) = parse_args((DemoConfig,), argv, prog="fit3d demo", description=DESCRIPTION)
    try:
        return run_demo(config)
    except DemoError as error:
        raise SystemExit(f"fit3d demo: {error}") from error


if __name__ == "__main__":
    main()
