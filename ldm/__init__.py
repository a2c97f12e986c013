"""Generic latent-diffusion core: UNet, VAE, OpenCLIP text encoder, noise schedule, DDIM, checkpoint I/O.

Pure PyTorch. Parameter names follow the original CompVis/Stability LDM code so that the released
Stable Diffusion 2 checkpoints load without any key conversion. This package never imports
``leftrefill`` or Lightning.
"""
