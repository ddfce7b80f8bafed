"""fit3d_hf: 3D-aware fine-tuning of 2D vision foundation models (FiT3D), Hugging Face native."""

__version__ = "0.1.0"
