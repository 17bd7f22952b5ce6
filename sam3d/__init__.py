"""sam3d: Segment Anything adapted to medical images, on MONAI."""

from sam3d.errors import Sam3DError

__version__ = "0.1.0"
__all__ = ["Sam3DError", "__version__"]
