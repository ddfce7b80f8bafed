"""`fit3d card`: render a model card with benchmark results into a model folder."""

from dataclasses import dataclass, field

from fit3d_hf.commands import parse_args

DESCRIPTION = """Write <model_dir>/README.md from a template in fit3d_hf/model_cards/.

The YAML header's `model-index` is filled from a results JSON written by `fit3d evaluate`
(the source whose role is "fit3d"), and the card shows the full table with the controls and
the protocol. Example:
  fit3d card --model_dir fit3d-model --results runs/eval/results.json --base_model facebook/dinov2-small
"""


@dataclass
class CardArguments:
    model_dir: str = field(metadata={"help": "A FiT3DModel folder; its README.md is (re)written."})
    results: str | None = field(default=None, metadata={"help": "results.json from `fit3d evaluate`."})
    template: str = field(
        default="fit3d_template", metadata={"help": "Template name in fit3d_hf/model_cards/ or a path to a .md file."}
    )
    model_name: str | None = field(default=None, metadata={"help": "Title of the card (default: the folder name)."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id of the backbone the model was fine-tuned from."})
    license: str | None = field(
        default=None, metadata={"help": "Licence id for the card (default: the backbone's, e.g. cc-by-nc-4.0 for MAE)."}
    )
    repo_id: str | None = field(default=None, metadata={"help": "The Hub id the model will have, for the card's usage snippet."})
    training: str | None = field(default=None, metadata={"help": "Free text for the Training section."})


def main(argv: list[str] | None = None):
    (args,) = parse_args((CardArguments,), argv, prog="fit3d card", description=DESCRIPTION)
    from fit3d_hf.hub import write_model_card

    extra = {
        k: v
        for k, v in (
            ("model_name", args.model_name),
            ("base_model", args.base_model),
            ("license", args.license),
            ("repo_id", args.repo_id),
            ("training", args.training),
        )
        if v is not None
    }
    path = write_model_card(args.model_dir, eval_results_path=args.results, extra=extra, template=args.template)
    print(f"wrote {path}")
    return path
