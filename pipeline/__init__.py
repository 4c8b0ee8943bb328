"""Segment gigapixel images with mirrored overlap-tile inference on Dask."""

__version__ = "0.1.0"
