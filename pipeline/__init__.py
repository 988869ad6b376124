"""ControlNet dataset pipeline on Ray Data."""

__version__ = "0.1.0"
