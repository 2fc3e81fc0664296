"""wsi-pipeline: differential cell counts for bone-marrow aspirate whole-slide images."""

__version__ = "0.1.0"
