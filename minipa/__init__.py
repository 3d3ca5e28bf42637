"""minipa: Stable Diffusion 1.5 with IP-Adapter, written from scratch to be read."""

__version__ = "0.1.0"
