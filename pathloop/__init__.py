"""pathloop: align class-conditional diffusion models of cell image patches with expert feedback."""

__version__ = "0.1.0"
