"""`fit3d push`: upload a model folder, a dataset folder or a Space folder to the Hugging Face Hub."""

from dataclasses import dataclass, field

from fit3d_hf.commands import parse_args

DESCRIPTION = """Upload a folder to the Hub with huggingface_hub (the repo is created if needed).

A model folder needs config.json and *.safetensors (write its card first with `fit3d card`);
a dataset folder (from `fit3d render` / Dataset.save_to_disk) goes up with --repo_type dataset;
a Space folder (from `fit3d space`) with --repo_type space.
Log in first (`hf auth login`) or pass --token. Examples:
  fit3d push --folder fit3d-model --repo_id me/fit3d-dinov2-small
  fit3d push --folder outputs/targets --repo_id me/fit3d-targets --repo_type dataset --private
  fit3d push --folder fit3d-space --repo_id me/fit3d-app --repo_type space
"""


@dataclass
class PushArguments:
    folder: str = field(metadata={"help": "The folder to upload."})
    repo_id: str = field(metadata={"help": "namespace/name on the Hub."})
    repo_type: str = field(default="model", metadata={"help": "model, dataset or space."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})


def main(argv: list[str] | None = None):
    (args,) = parse_args((PushArguments,), argv, prog="fit3d push", description=DESCRIPTION)
    from fit3d_hf.hub import push_to_hub

    url = push_to_hub(
        args.folder,
        args.repo_id,
        repo_type=args.repo_type,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(f"uploaded {args.folder} to {args.repo_id}: {url}")
    return url
