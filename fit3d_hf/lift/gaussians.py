"""`FeatureGaussians`: the artifact of Stage I, one scene's lifted Gaussians and their feature decoder."""

import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import InputError
from ..io import atomic_write
from ..splatting.rasterize import rasterize
from .config import DEFAULT_NEAR_PLANE

FORMAT = "fit3d_hf.feature_gaussians.v1"
# Gaussian parameters in the order they are stored; `shN` is absent for SH degree 0.
PARAM_NAMES = ("means", "quats", "scales", "opacities", "sh0", "shN", "features")


class FeatureGaussians:
    """The lifted Gaussians of one scene and their feature decoder.

    Tensors (stored under these names in the `.safetensors` file):
        means `[N, 3]`, quats `[N, 4]` (wxyz, unnormalised), scales `[N, 3]` (log),
        opacities `[N]` (logit), sh0 `[N, 1, 3]`, shN `[N, K-1, 3]` (K = (sh_degree+1)^2; absent
        for degree 0), features `[N, D]`, decoder.weight `[Cb, D, 3, 3]`.
    `metadata` is a dict of strings (scene id, backbone, D, Cb, SH degree, near plane, input
    normalisation, format).
    """

    def __init__(self, params: Mapping[str, torch.Tensor], decoder_weight: torch.Tensor, metadata: Mapping[str, str]):
        self.params = {name: params[name].detach() for name in PARAM_NAMES if name in params}
        self.decoder_weight = decoder_weight.detach()
        self.metadata = dict(metadata)

    @property
    def feature_dim(self) -> int:
        """D, the width of the lifted features."""
        return self.params["features"].shape[1]

    @property
    def out_dim(self) -> int:
        """Cb, the width of the decoded features (the backbone's width)."""
        return self.decoder_weight.shape[0]

    @property
    def num_gaussians(self) -> int:
        return self.params["means"].shape[0]

    @property
    def sh_degree(self) -> int:
        num_coefficients = 1 + (self.params["shN"].shape[1] if "shN" in self.params else 0)
        return math.isqrt(num_coefficients) - 1

    @property
    def near_plane(self) -> float:
        """The near plane the Gaussians were lifted with (`LiftConfig.near_plane`), which `render` keeps."""
        return float(self.metadata.get("near_plane", DEFAULT_NEAR_PLANE))  # files from before it was recorded

    def to(self, device: torch.device | str) -> "FeatureGaussians":
        """A copy on `device`."""
        params = {name: value.to(device) for name, value in self.params.items()}
        return FeatureGaussians(params, self.decoder_weight.to(device), self.metadata)

    def render(
        self,
        intrinsics: torch.Tensor,
        world_to_camera: torch.Tensor,
        width: int,
        height: int,
        backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Render colour, lifted features and opacity on a black background, with the lifting's near plane.

        Args:
            intrinsics: `[V, 3, 3]` pinhole K for `width` × `height` images.
            world_to_camera: `[V, 4, 4]` OpenCV-convention viewmats.

        Returns:
            rgb `[V, 3, H, W]` in [0, 1], features `[V, D, H, W]` (decode with `decode`),
            alphas `[V, 1, H, W]`.
        """
        device = self.params["means"].device
        renders, alphas, meta = rasterize_params(
            self.params,
            intrinsics.to(device),
            world_to_camera.to(device),
            width,
            height,
            self.sh_degree,
            backend,
            near_plane=self.near_plane,
        )
        rgb = renders.clamp(0, 1).permute(0, 3, 1, 2)
        return rgb, meta["features"].permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """`[V, D, H, W]` rendered features → `[V, Cb, H, W]` in the backbone's feature space."""
        return F.conv2d(features, self.decoder_weight.to(features), padding=1)

    def save(self, path: str | os.PathLike) -> None:
        """Write the safetensors file atomically (a temp name, then `os.replace`)."""
        tensors = {name: value.contiguous().cpu() for name, value in self.params.items()}
        tensors["decoder.weight"] = self.decoder_weight.contiguous().cpu()
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=self.metadata))

    @staticmethod
    def read_metadata(path: str | os.PathLike) -> dict[str, str]:
        """The metadata of a file written by `save` (strings: scene id, backbone, D, provenance...),
        without reading its tensors.

        Raises:
            InputError: the file is not a safetensors file (e.g. truncated) or not feature Gaussians.
        """
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (OSError, SafetensorError) as error:
            raise InputError(f"{path}: unreadable safetensors file ({error}); lift the scene again") from error
        if metadata.get("format") != FORMAT:
            raise InputError(f"{path}: not a feature-Gaussians file (format {metadata.get('format')!r}, expected {FORMAT!r})")
        return metadata

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "FeatureGaussians":
        """Read a file written by `save` / `lift_scene`."""
        metadata = cls.read_metadata(path)
        try:
            tensors = load_file(str(path), device=str(device))
        except (OSError, SafetensorError) as error:
            raise InputError(f"{path}: unreadable safetensors file ({error}); lift the scene again") from error
        return cls(tensors, tensors.pop("decoder.weight"), metadata)


def rasterize_params(
    params: Mapping[str, torch.Tensor],
    intrinsics: torch.Tensor,
    world_to_camera: torch.Tensor,
    width: int,
    height: int,
    sh_degree: int,
    backend: str,
    check_finite: bool = True,
    near_plane: float = DEFAULT_NEAR_PLANE,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Activate the parameters (`FeatureGaussians` layout) and rasterize colour (SH up to `sh_degree`) and features.

    `check_finite=False` skips `rasterize`'s NaN/Inf scan of the inputs (one wait for the GPU per call);
    Gaussians nearer than `near_plane` (camera depth) are culled.

    Returns:
        `rasterize`'s (renders `[V, H, W, 3]`, alphas `[V, H, W, 1]`, meta with features `[V, H, W, D]`).
    """
    coefficients = params["sh0"] if "shN" not in params else torch.cat([params["sh0"], params["shN"]], dim=1)
    return rasterize(
        params["means"],
        params["quats"],
        params["scales"].exp(),
        params["opacities"].sigmoid(),
        coefficients,
        world_to_camera,
        intrinsics,
        width,
        height,
        sh_degree=sh_degree,
        features=params["features"],
        backend=backend,
        check_finite=check_finite,
        near_plane=near_plane,
    )
