"""Scene and backbone options shared by `fit3d lift` and `fit3d render`, so both see the same scenes."""

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class SceneArguments:
    """Which scenes (folders and/or procedural rooms) and which backbone."""

    scenes: list[str] = field(default_factory=list, metadata={"help": "Scene folders (see `fit3d_hf.scenes.load_scene`)."})
    synthetic_rooms: int = field(
        default=0, metadata={"help": "Also use this many procedural rooms (seeds synthetic_seed, +1, ...)."}
    )
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the first procedural room."})
    synthetic_views: int = field(default=24, metadata={"help": "Views per procedural room (every 8th is held out)."})
    synthetic_height: int = field(default=120, metadata={"help": "Image height of the procedural rooms."})
    synthetic_width: int = field(default=160, metadata={"help": "Image width of the procedural rooms."})
    downscale: float = field(default=1.0, metadata={"help": "Load scene folders at their size divided by this (>= 1)."})
    skip_missing: bool = field(default=False, metadata={"help": "Go on without frames whose image file is missing (reported)."})
    backbone: str = field(
        default="embedded",
        metadata={
            "help": "Backbone: 'embedded' (the package's small pre-trained ViT), 'tiny:<family>' or "
            "'random:<preset>' (randomly initialised, seeded by --seed), or a local transformers model folder."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the lifting and of a random backbone (use one value for every stage)."}
    )


def build_named_backbone(name: str, seed: int) -> tuple[torch.nn.Module, str]:
    """Resolve `--backbone` into a model and the name recorded in every artifact."""
    from fit3d_hf import backbones

    if name == "embedded":
        from fit3d_hf.embedded import EMBEDDED_BACKBONE_NAME, load_embedded_backbone

        return load_embedded_backbone(), EMBEDDED_BACKBONE_NAME
    kind, _, value = name.partition(":")
    if kind in ("tiny", "random") and value:
        config = backbones.tiny_config(value) if kind == "tiny" else backbones.preset_config(value)
        # Every process must build the same random weights.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = backbones.build_backbone(config)
        return model, f"{name} (random init, seed {seed})"
    return backbones.load_backbone(name), name


def scene_loaders(args: SceneArguments) -> dict:
    """scene id → loader, for the scene folders and the procedural rooms (nothing is loaded yet)."""
    from fit3d_hf.scenes import load_scene, sanitize_scene_id
    from fit3d_hf.scenes.synthetic import make_room

    loaders = {}
    for path in map(Path, args.scenes):
        # Named after the capture folder (the parent of a transforms .json file).
        scene_id = sanitize_scene_id((path.parent if path.is_file() else path).resolve().name)
        loaders[scene_id] = lambda path=path, scene_id=scene_id: load_scene(
            path, downscale=args.downscale, skip_missing=args.skip_missing, scene_id=scene_id
        )
    for seed in range(args.synthetic_seed, args.synthetic_seed + args.synthetic_rooms):
        loaders[f"room_{seed:04d}"] = lambda seed=seed: make_room(
            seed, num_views=args.synthetic_views, height=args.synthetic_height, width=args.synthetic_width
        )
    return loaders
