"""`fit3d app`: see a FiT3D model's features in a Gradio app in the browser."""

from dataclasses import dataclass, field

from fit3d_hf.commands import parse_args

DESCRIPTION = """Serve the FiT3D feature app (needs gradio: pip install 'fit3d_hf[app]').

Upload an image, or pick a procedural room, and compare the original, the FiT3D (concat) and the
fine-tuned features side by side: PCA as RGB, k-means clusters, and the similarity to a clicked
point; a second view of the scene shows where the point matches there. The app only reads the
model folder. It listens on 127.0.0.1 unless --host says otherwise. Examples:
  fit3d app --model fit3d-demo/model                 # the model `fit3d demo` wrote
  fit3d app --model fit3d-dinov2-small --port 7861   # a converted official release
"""


@dataclass
class AppArguments:
    model: str = field(metadata={"help": "A FiT3D model folder (e.g. fit3d-demo/model) or Hub id."})
    port: int | None = field(default=None, metadata={"help": "Port (default: gradio's 7860, or the next free one)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on; 0.0.0.0 serves every network interface."})
    long_side: int | None = field(
        default=None,
        metadata={"help": "Default long side (px) of the views fed to the model (default: its native size, at most 448)."},
    )


def main(argv: list[str] | None = None):
    (args,) = parse_args((AppArguments,), argv, prog="fit3d app", description=DESCRIPTION)
    from fit3d_hf.app import build_app, load_fit3d_model

    try:
        model = load_fit3d_model(args.model)
        app = build_app(model, long_side=args.long_side)
    except (ValueError, ImportError) as error:
        raise SystemExit(f"fit3d app: {error}") from error
    app.launch(server_name=args.host, server_port=args.port)
    return app
