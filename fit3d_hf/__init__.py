"""fit3d_hf: 3D-aware fine-tuning of 2D vision foundation models (FiT3D), Hugging Face native."""

from .threads import prepare_openmp

# Before transformers loads torch: OpenMP reads its wait policy once (fit3d_hf.threads explains why).
prepare_openmp()

from transformers import AutoBackbone, AutoConfig, AutoModel  # noqa: E402

from .configuration_fit3d import FiT3DConfig  # noqa: E402
from .modeling_fit3d import FiT3DBackbone, FiT3DModel, FiT3DModelOutput  # noqa: E402

__version__ = "0.1.0"

# `import fit3d_hf` is enough for AutoConfig/AutoModel/AutoBackbone.from_pretrained on a FiT3D folder.
AutoConfig.register("fit3d", FiT3DConfig)
AutoModel.register(FiT3DConfig, FiT3DModel)
AutoBackbone.register(FiT3DConfig, FiT3DBackbone)

__all__ = ["FiT3DBackbone", "FiT3DConfig", "FiT3DModel", "FiT3DModelOutput", "__version__"]
