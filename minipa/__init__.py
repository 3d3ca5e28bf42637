"""minipa: Stable Diffusion 1.5 with IP-Adapter, written from scratch to be read."""

__version__ = "0.1.0"

from minipa.pipeline import Pipeline, load_pipeline  # noqa: E402  (after __version__, which the CLI reads)

__all__ = ["Pipeline", "load_pipeline", "__version__"]
