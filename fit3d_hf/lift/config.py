"""`LiftConfig`: the hyper-parameters of Stage I, with the official defaults, the paper preset and a CPU preset."""

from dataclasses import dataclass, field

from ..backbones import NORMALIZATIONS, SIZE_RULES

# Schedule fields of `LiftConfig` are given for a run of this many iterations (the official one).
REFERENCE_ITERATIONS = 30_000
# Random initial Gaussians of a scene without points when `init_points` is 0 (3DGS's count).
RANDOM_INIT_POINTS = 100_000
TRAIN_ON = ("train", "all")
# Gaussians nearer than this (camera depth) are not rendered: gsplat's default; the official rasterizer's is 0.2.
DEFAULT_NEAR_PLANE = 0.01


@dataclass
class LiftConfig:
    """Hyper-parameters of Stage I. Defaults are the official FiT3D / 3DGS optimisation values
    (docs/protocol.md); `paper_preset()` also takes the official data settings (every scene point,
    every view, the official near plane and normalisation) and `cpu_preset()` is for a CPU.

    Schedule fields (`sh_degree_every`, `refine_*`, `reset_opacity_every`) count iterations of a
    30k-iteration run and are scaled by `iterations / 30000`, so that any run length keeps the
    official proportions (e.g. 600 iterations: densify from 10 to 300 every 2, reset every 60).
    """

    iterations: int = field(default=30_000, metadata={"help": "Optimisation steps per scene (one view per step)."})
    feature_dim: int = field(default=64, metadata={"help": "Width D of the lifted per-Gaussian feature."})
    sh_degree: int = field(default=3, metadata={"help": "Maximum SH degree of the colour (0-3)."})
    sh_degree_every: int = field(default=1_000, metadata={"help": "One more SH degree every this many (reference) steps."})
    rgb_l1_weight: float = field(default=0.8, metadata={"help": "Weight of the RGB L1 term."})
    ssim_weight: float = field(default=0.2, metadata={"help": "Weight of the RGB (1 - SSIM) term."})
    feature_weight: float = field(default=1.0, metadata={"help": "Weight of the feature L1 term."})
    lr_means: float = field(default=1.6e-4, metadata={"help": "Initial lr of the means, times the camera extent."})
    lr_means_final: float = field(
        default=1.6e-6, metadata={"help": "Final lr of the means (exponential decay), times the extent."}
    )
    lr_sh0: float = field(default=2.5e-3, metadata={"help": "lr of the SH DC coefficients."})
    lr_shN: float = field(default=1.25e-4, metadata={"help": "lr of the higher SH coefficients."})
    lr_opacities: float = field(default=0.05, metadata={"help": "lr of the opacity logits."})
    lr_scales: float = field(default=5e-3, metadata={"help": "lr of the log-scales."})
    lr_quats: float = field(default=1e-3, metadata={"help": "lr of the rotations."})
    lr_features: float = field(default=6.25e-5, metadata={"help": "lr of the per-Gaussian features."})
    lr_decoder: float = field(default=6.25e-5, metadata={"help": "lr of the feature decoder."})
    refine_start: int = field(default=500, metadata={"help": "Densify after this many (reference) steps."})
    refine_stop: int = field(default=15_000, metadata={"help": "Stop densifying after this many (reference) steps."})
    refine_every: int = field(default=100, metadata={"help": "Densify every this many (reference) steps."})
    reset_opacity_every: int = field(
        default=3_000, metadata={"help": "Reset opacities every this many (reference) steps (0: never)."}
    )
    grow_grad2d: float = field(default=2e-4, metadata={"help": "Clone/split Gaussians whose mean screen gradient exceeds this."})
    prune_opacity: float = field(default=0.005, metadata={"help": "Prune Gaussians less opaque than this."})
    max_gaussians: int = field(default=0, metadata={"help": "Cap on the number of Gaussians (0: no cap)."})
    init_points: int = field(
        default=100_000,
        metadata={
            "help": "Initial Gaussians: at most this many scene points, a random subset (0: all of them, as the official "
            "code); a scene without points starts from this many random ones (100,000 when 0)."
        },
    )
    init_opacity: float = field(default=0.1, metadata={"help": "Initial opacity."})
    train_on: str = field(
        default="train",
        metadata={
            "help": "Views to fit: 'train' (the scene's train views; its test views, or every holdout_every-th view, are "
            "held out and measured) or 'all' (every view, as the official code with eval=False; measured on them)."
        },
    )
    holdout_every: int = field(
        default=8,
        metadata={"help": "For scenes without test views: hold out the views whose index is a multiple of this (0: none)."},
    )
    near_plane: float = field(
        default=DEFAULT_NEAR_PLANE,
        metadata={"help": "Gaussians closer to the camera than this (depth) are not rendered (official rasterizer: 0.2)."},
    )
    input_size_rule: str = field(
        default="floor",
        metadata={
            "help": "Backbone input size: each image side 'floor'ed to a multiple of the patch size (official: "
            "876x584 -> 868x574 at patch 14) or rounded to the 'nearest' one (882x588)."
        },
    )
    normalization: str | None = field(
        default=None,
        metadata={
            "help": "Normalisation of the backbone's input: 'imagenet' (ImageNet mean/std for every backbone, as the "
            "official code), 'family' (the family's own), or unset: what the backbone's config records."
        },
    )
    render_downscale: int = field(default=1, metadata={"help": "Train and evaluate at the scene size divided by this."})
    feature_downscale: int = field(
        default=1, metadata={"help": "Decode and compare features at the render size divided by this."}
    )
    checkpoint_every: int = field(default=1_000, metadata={"help": "Write a resumable checkpoint every this many steps."})
    check_every: int = field(
        default=100,
        metadata={
            "help": "Check the loss and the parameters for NaN/inf every this many steps and before each checkpoint "
            "(each check waits for the GPU)."
        },
    )
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep the checkpoints of a finished scene."})
    backend: str = field(
        default="auto", metadata={"help": "Rasterizer: auto (gsplat on CUDA if its kernels can run, else torch), torch, gsplat."}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.sh_degree <= 3:
            raise ValueError(f"sh_degree must be in 0..3, got {self.sh_degree}")
        for name in ("iterations", "feature_dim", "render_downscale", "feature_downscale", "checkpoint_every", "check_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.init_points < 0:
            raise ValueError(f"init_points must be >= 0 (0: all scene points), got {self.init_points}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if not self.near_plane > 0:
            raise ValueError(f"near_plane must be > 0, got {self.near_plane}")
        if self.input_size_rule not in SIZE_RULES:
            raise ValueError(f"input_size_rule must be one of {SIZE_RULES}, got {self.input_size_rule!r}")
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS} or None, got {self.normalization!r}")

    @classmethod
    def paper_preset(cls, **overrides) -> "LiftConfig":
        """The official Stage I (`train_feat_gaussian.py` with its defaults), selected by `fit3d lift --protocol paper`.

        The defaults' optimisation (30k steps, losses, learning rates, densification and opacity
        reset, whose pruning matches the official code's: see `CappedDefaultStrategy`) with the
        official data settings: every scene point initialises a Gaussian (`init_points=0`),
        every view is fitted (`train_on="all"`: the official `eval=False` merges train and test
        frames), Gaussians nearer than 0.2 are not rendered (`near_plane`, the official
        rasterizer's `in_frustum`), the backbone's input is normalised with ImageNet's statistics
        whatever the family and floored to patch multiples. Every value beside its official file:
        docs/protocol.md. Also written out as recipes/configs/lift_paper.yaml (with backend gsplat).
        """
        return cls(**{**PAPER_PRESET, **overrides})

    @classmethod
    def cpu_preset(cls, **overrides) -> "LiftConfig":
        """Settings that lift a 160×120 synthetic room in about a minute on 2 CPU cores.

        The official losses and learning rates over 400 steps (schedules scaled), except:
        features and decoder learn at 2.5e-3 (the official 6.25e-5 moves zero-initialised features
        by only ~lr per step: far too little in 400 steps); no opacity reset (scaled, one every 40
        steps: 12.1 dB held-out PSNR instead of 26.0); densification every 20 steps instead of the
        scaled every step (25.4 dB); at most 20k Gaussians; features decoded at half the render
        size (22% faster with a 160-wide backbone, feature cosine within 0.003 at full size).
        Measurements and commands: docs/lifting.md.
        """
        values = dict(CPU_PRESET)
        values.update(overrides)
        return cls(**values)

    def scaled(self, reference_steps: int) -> int:
        """A schedule length given for the 30k-step reference run, scaled to `iterations` (>= 1)."""
        return max(1, round(reference_steps * self.iterations / REFERENCE_ITERATIONS))


# What `paper_preset` changes in the defaults (recipes/configs/lift_paper.yaml; a test checks they agree).
PAPER_PRESET = dict(init_points=0, train_on="all", near_plane=0.2, input_size_rule="floor", normalization="imagenet")

# Also written out as recipes/configs/lift_cpu.yaml (a test checks they agree).
CPU_PRESET = dict(
    iterations=400,
    init_points=15_000,
    max_gaussians=20_000,
    refine_every=1_500,
    reset_opacity_every=0,
    lr_features=2.5e-3,
    lr_decoder=2.5e-3,
    feature_downscale=2,
    checkpoint_every=100,
)
