"""`fit3d space`: write a Hugging Face Space folder of the FiT3D feature app for a model."""

from dataclasses import dataclass, field

from fit3d_hf.commands import parse_args

DESCRIPTION = """Write a folder that can be pushed as a Hugging Face Space as is: app.py, requirements.txt and
a README with the Space metadata (sdk gradio, sdk_version = the installed gradio, app_file, models).

fit3d_hf is not on PyPI: by default the package is vendored into the folder (fit3d_hf/) and
requirements.txt lists its dependencies; --package_requirement installs it from elsewhere instead
(e.g. a git URL with a tag). A model folder is copied into model/; a Hub id is loaded by the Space.
Needs gradio installed (pip install 'fit3d_hf[app]'). Examples:
  fit3d space --model me/fit3d-demo --output fit3d-space
  fit3d push --folder fit3d-space --repo_id me/fit3d-demo-app --repo_type space
  fit3d space --model fit3d-demo/model --output fit3d-space \\
      --package_requirement "fit3d_hf @ git+https://github.com/<org>/fit3d_hf@v0.1.0"
"""


@dataclass
class SpaceArguments:
    model: str = field(metadata={"help": "A FiT3D model folder (copied into the Space) or a Hub id."})
    output: str = field(metadata={"help": "The Space folder to write (must not hold files unless --overwrite)."})
    package_requirement: str | None = field(
        default=None, metadata={"help": "A pip requirement for fit3d_hf instead of vendoring the package."}
    )
    title: str = field(default="FiT3D features", metadata={"help": "The Space's title."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


def main(argv: list[str] | None = None):
    (args,) = parse_args((SpaceArguments,), argv, prog="fit3d space", description=DESCRIPTION)
    from fit3d_hf.app import write_space

    try:
        folder = write_space(
            args.model, args.output, package_requirement=args.package_requirement, title=args.title, overwrite=args.overwrite
        )
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"fit3d space: {error}") from error
    print(f"wrote {folder}; push it with: fit3d push --folder {folder} --repo_id <namespace>/<name> --repo_type space")
    return folder
