"""LeftRefill (CVPR 2024): reference-guided synthesis with a frozen SD2 inpainting model and learned prompt tokens.

The generic latent-diffusion core lives in ``ldm``; this package holds the method built on it.
"""

__version__ = "0.1.0"

from leftrefill.pipeline import LeftRefillPipeline  # noqa: E402  (the version is importable without torch)

__all__ = ["LeftRefillPipeline", "__version__"]
