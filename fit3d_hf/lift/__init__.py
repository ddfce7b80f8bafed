"""Stage I of FiT3D: lift a frozen backbone's features into feature Gaussians, one scene at a time.

Each Gaussian carries SH colour, an opacity, a scale, a rotation and a D-dim feature; a per-scene
`Conv2d(D, Cb, 3, padding=1, bias=False)` decodes rendered features to the backbone's width Cb.
Loss = 0.8·L1(rgb) + 0.2·(1 − SSIM(rgb)) + 1.0·L1(decoded features, backbone patch features
bilinearly upsampled to the render size); masked pixels count in neither term (`losses.py`).
Densification is `fit3d_hf.splatting.CappedDefaultStrategy` (gsplat's `DefaultStrategy` with a
working opacity reset and a cap on the count).

Modules: `config` (LiftConfig), `gaussians` (the FeatureGaussians artifact), `initialization`,
`views` (images and backbone targets), `losses`, `state` (the resumable state and its checkpoint
files), `loop` (lift_scene, lift_scenes), `evaluation` (metrics, summary_table).

All lifting state (parameters, Adam moments, strategy state, RNG) is checkpointed to
`<output_dir>/.checkpoints/<scene_id>/`, so a killed run resumes and ends with the same artifact as
an uninterrupted one (CPU, fixed seed).

Example:

    >>> from fit3d_hf.backbones import build_backbone, tiny_config
    >>> from fit3d_hf.scenes.synthetic import make_room
    >>> gaussians = lift_scene(make_room(0), build_backbone(tiny_config("dinov2")),
    ...                        LiftConfig.cpu_preset(), output_dir="lifted")
    >>> rgb, features, alphas = gaussians.render(K, w2c, width=160, height=120)
    >>> decoded = gaussians.decode(features)  # [V, Cb, 120, 160]
"""

from .config import LiftConfig
from .evaluation import summary_table
from .gaussians import FeatureGaussians
from .loop import lift_scene, lift_scenes

__all__ = ["FeatureGaussians", "LiftConfig", "lift_scene", "lift_scenes", "summary_table"]
