"""The whole FiT3D pipeline on procedural rooms (`fit3d demo`): one entry, `run_demo(DemoConfig)`.

    result = run_demo(DemoConfig(output_dir="fit3d-demo"))  # DemoResult: results, replications, verdicts, timings, paths

Stages, each a function of `demo` writing one artifact into the run folder (scenes..evaluate once per
replication, in its own folder: replication 0 in the run folder, replication k in replications/k,
`config.replication_config`):

    scenes    scenes.json               procedural rooms: fine-tuning rooms, probe-train rooms, test rooms
    lift      lifted/                   Stage I (`fit3d_hf.lift.lift_scenes`) on the fine-tuning rooms
    render    targets/, targets_blur/   `fit3d_hf.targets.render_targets`: lifted and single-view blurred targets
    finetune  model/, control_blur/     Stage II (`fit3d_hf.finetune.finetune`) on each targets dataset
    evaluate  eval/                     `fit3d_hf.evaluation.evaluate` with every control, on unseen rooms
    pictures  pictures/                 `fit3d_hf.viz`: PCA / k-means of the features, loss curves
    replicate replications.json         the verdicts across replications (`report`, `fit3d_hf.evaluation.replication`)
    card      model/README.md           `fit3d_hf.hub.write_model_card` with the results and those verdicts
    summary   summary.md, timings.json  the results grid and verdicts (`report`)

The rerun rule, one for every stage (`rerun.run_stage`, recorded per stage in `demo.json`): a stage
is skipped when it is complete and its record holds the settings it was made with equal to the
current ones (`config.stage_settings`: its own and every earlier stage's); a stage that was started
with the same settings but not completed resumes through its own mechanism (lift checkpoints,
render parts, finetune checkpoints, the evaluation cache); a stage made or started with other
settings is refused with a `DemoError` naming them and the fix (`fresh=True` / `--fresh`, or
another output_dir) — except the derived stages (replicate, card, summary), which are redone. Every file is written through `fit3d_hf.io`.

Modules: `config` (DemoConfig, the settings per stage, room seeds, replications), `rerun` (the run
folder and the rule), `demo` (the stages, `run_demo`, DemoResult), `report` (results grid, verdicts
across replications, summary).
"""

from .config import DemoConfig, DemoError
from .demo import DemoResult, run_demo

__all__ = ["DemoConfig", "DemoError", "DemoResult", "run_demo"]
