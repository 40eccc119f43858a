"""Diffusion Policy: visuomotor policy learning via action diffusion (Chi et al., RSS 2023)."""

__version__ = "0.1.0"
