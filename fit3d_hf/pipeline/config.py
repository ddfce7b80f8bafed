"""`DemoConfig`: the settings of a demo run, which of them each stage's artifact depends on, and the replications."""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fit3d_hf.errors import InputError

STAGES = ("scenes", "lift", "render", "finetune", "evaluate", "pictures", "replicate", "card", "summary")
# Every replication runs scenes..evaluate in its own folder; pictures..summary run once, in the run folder.
# The settings each stage adds to those of the stages before it; a stage's artifact depends on its
# own and every earlier stage's (`stage_settings`). output_dir, workers and fresh change no artifact.
STAGE_SETTINGS = {
    "scenes": (
        "num_train_scenes",
        "num_probe_train_scenes",
        "num_test_scenes",
        "scene_views",
        "scene_height",
        "scene_width",
        "scene_seed",
        "probe_scene_seed",
    ),
    # backbone_name is the resolved name of --backbone: a local folder may hold another model later.
    "lift": ("backbone", "backbone_name", "seed", "lift_iterations", "lift_max_gaussians", "lift_init_points"),
    "render": ("blur_sigma",),
    "finetune": ("finetune_steps", "finetune_batch_size", "learning_rate"),
    "evaluate": ("probe_seeds", "seg_iterations", "depth_iterations", "probe_height", "probe_width"),
    "pictures": (),
    # The replications' rooms and seeds follow from the settings above and the index (`replication_config`).
    "replicate": ("replications",),
    "card": (),
    "summary": (),
}


class DemoError(InputError):
    """A run the demo refuses: settings that contradict each other or the run folder, or a stage
    result that makes the rest meaningless. The message names the cause and the fix."""


@dataclass
class DemoConfig:
    """Settings of `run_demo` (the options of `fit3d demo`)."""

    output_dir: str = field(default="fit3d-demo", metadata={"help": "Run folder (resumable)."})
    backbone: str = field(
        default="embedded",
        metadata={
            "help": "'embedded' (the package's small SimMIM-pretrained ViT), or a folder / Hub id of a transformers backbone."
        },
    )
    num_train_scenes: int = field(
        default=2, metadata={"help": "Rooms lifted and fine-tuned on (seeds scene_seed, scene_seed+1, ...)."}
    )
    num_probe_train_scenes: int = field(
        default=3, metadata={"help": "Other rooms the linear probes train on (seeds probe_scene_seed, ...)."}
    )
    num_test_scenes: int = field(default=2, metadata={"help": "Unseen rooms the probes and correspondence are tested on."})
    scene_views: int = field(default=16, metadata={"help": "Views per room."})
    scene_height: int = field(default=120, metadata={"help": "Room image height."})
    scene_width: int = field(default=160, metadata={"help": "Room image width."})
    scene_seed: int = field(default=0, metadata={"help": "Seed of the first fine-tuning room."})
    probe_scene_seed: int = field(
        default=1000, metadata={"help": "Seed of the first probe room (test rooms follow the probe-train rooms)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of lifting, fine-tuning and the random-ViT control."})
    lift_iterations: int = field(default=300, metadata={"help": "Lifting steps per room (CPU preset otherwise)."})
    lift_max_gaussians: int = field(default=8_000, metadata={"help": "Cap on Gaussians per room."})
    lift_init_points: int = field(default=4_000, metadata={"help": "Initial Gaussians per room (from the room's points)."})
    blur_sigma: float = field(default=1.0, metadata={"help": "Blur of the single-view control targets, in patch-grid cells."})
    finetune_steps: int = field(default=100, metadata={"help": "Fine-tuning steps (each run)."})
    finetune_batch_size: int = field(default=8, metadata={"help": "Views per fine-tuning step."})
    learning_rate: float = field(
        default=3e-4, metadata={"help": "Fine-tuning lr (30x the paper's: 1e-5 barely moves a tiny ViT in 100 steps)."}
    )
    probe_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2], metadata={"help": "Probe seeds (the spread the verdicts use)."}
    )
    seg_iterations: int = field(default=200, metadata={"help": "Steps of each segmentation probe."})
    depth_iterations: int = field(default=100, metadata={"help": "Steps of each depth probe (the costlier one)."})
    probe_height: int = field(default=96, metadata={"help": "Image height fed to every source by the probes."})
    probe_width: int = field(default=128, metadata={"help": "Image width fed to every source by the probes."})
    replications: int = field(
        default=1,
        metadata={
            "help": "Independent replications, each with its own fine-tuning rooms, probe rooms and seed; the verdicts "
            "need >= 2 (replication 0 is the run folder itself, replication k >= 1 is replications/k)."
        },
    )
    workers: int = field(
        default=0,
        metadata={
            "help": "Worker processes, one torch thread each, that lift the rooms, run the two fine-tunings and train each "
            "probe seed's probes side by side: 0 (default): one per job, at most two per available core; 1: in this "
            "process, with --threads threads. Changes no result beyond float rounding."
        },
    )
    fresh: bool = field(default=False, metadata={"help": "Delete the run folder's previous results and start over."})


def stage_settings(config: DemoConfig, stage: str, backbone_name: str) -> dict[str, Any]:
    """The settings `stage`'s artifact depends on: its own and those of every stage before it."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
    values = {"backbone_name": backbone_name}
    keys = [key for name in STAGES[: STAGES.index(stage) + 1] for key in STAGE_SETTINGS[name]]
    return {key: values[key] if key in values else getattr(config, key) for key in keys}


def room_seeds(config: DemoConfig) -> dict[str, list[int]]:
    """Seeds of the fine-tuning rooms, the probe-training rooms and the unseen test rooms (disjoint)."""
    probe_test_seed = config.probe_scene_seed + config.num_probe_train_scenes
    seeds = {
        "finetune": list(range(config.scene_seed, config.scene_seed + config.num_train_scenes)),
        "probe_train": list(range(config.probe_scene_seed, probe_test_seed)),
        "test": list(range(probe_test_seed, probe_test_seed + config.num_test_scenes)),
    }
    overlap = set(seeds["finetune"]) & set(seeds["probe_train"] + seeds["test"])
    if overlap:
        raise DemoError(f"fine-tuning and probe rooms share seeds {sorted(overlap)}; move --probe_scene_seed")
    return seeds


def replication_config(config: DemoConfig, index: int) -> DemoConfig:
    """The settings of replication `index`: replication 0 is `config` itself; replication k takes the next
    block of fine-tuning rooms (scene_seed + k * num_train_scenes, ...), of probe rooms (probe_scene_seed +
    k * (num_probe_train_scenes + num_test_scenes), ...) and the seed seed + k, in the folder replications/k."""
    if not 0 <= index < config.replications:
        raise ValueError(f"replication {index} does not exist: the run has {config.replications} (0..{config.replications - 1})")
    if index == 0:
        return config
    return replace(
        config,
        output_dir=str(Path(config.output_dir) / "replications" / f"{index:02d}"),
        scene_seed=config.scene_seed + index * config.num_train_scenes,
        probe_scene_seed=config.probe_scene_seed + index * (config.num_probe_train_scenes + config.num_test_scenes),
        seed=config.seed + index,
        replications=1,
        fresh=False,
    )


def replication_configs(config: DemoConfig) -> list[DemoConfig]:
    """The settings of every replication (`replication_config`), with disjoint rooms across all of them.

    Raises:
        DemoError: fewer than one replication, or a fine-tuning room of one replication is a probe room of another.
    """
    if config.replications < 1:
        raise DemoError(f"--replications must be >= 1, got {config.replications}")
    if config.workers < 0:
        raise DemoError(f"--workers must be >= 0 (0: one per job, at most two per available core), got {config.workers}")
    configs = [replication_config(config, index) for index in range(config.replications)]
    seeds = [room_seeds(c) for c in configs]
    finetune = {seed for s in seeds for seed in s["finetune"]}
    probe = {seed for s in seeds for seed in s["probe_train"] + s["test"]}
    if finetune & probe:
        raise DemoError(
            f"the fine-tuning rooms of the {config.replications} replications reach the probe rooms (shared seeds "
            f"{sorted(finetune & probe)[:5]}...); move --probe_scene_seed above {max(finetune)}"
        )
    return configs
