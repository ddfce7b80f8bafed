"""Scene and backbone options shared by `fit3d lift` and `fit3d render`, so both see the same scenes."""

from dataclasses import dataclass, field

from fit3d_hf.backbone_specs import BACKBONE_SPEC_HELP


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
    images: list[str] = field(
        default_factory=list,
        metadata={"help": "The images folder of each COLMAP folder in --scenes, in the same order (default: <scene>/images)."},
    )
    allow_external_paths: bool = field(
        default=False,
        metadata={"help": "Accept capture files (transforms.json, COLMAP) that name files outside the capture folder."},
    )
    backbone: str = field(
        default="embedded",
        metadata={"help": BACKBONE_SPEC_HELP},
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the lifting and of a random backbone (use one value for every stage)."}
    )


def scenes_of(args: SceneArguments) -> list:
    """The scenes the arguments name (`fit3d_hf.scenes.load_scenes`)."""
    from fit3d_hf.scenes import load_scenes

    return load_scenes(
        args.scenes,
        downscale=args.downscale,
        skip_missing=args.skip_missing,
        synthetic_rooms=args.synthetic_rooms,
        synthetic_seed=args.synthetic_seed,
        synthetic_views=args.synthetic_views,
        synthetic_height=args.synthetic_height,
        synthetic_width=args.synthetic_width,
        images=args.images,
        allow_external_paths=args.allow_external_paths,
    )
