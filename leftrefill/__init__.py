"""LeftRefill (CVPR 2024): reference-guided synthesis with a frozen SD2 inpainting model and learned prompt tokens.

The generic latent-diffusion core lives in ``ldm``; this package holds the method built on it.
"""

__version__ = "0.1.0"
