"""``sam3d serve``: a local web viewer for click segmentation (see :mod:`sam3d.serve.app`)."""

from sam3d.serve.app import create_app
from sam3d.serve.masks import decode_mask, encode_mask
from sam3d.serve.sessions import SessionStore

__all__ = ["SessionStore", "create_app", "decode_mask", "encode_mask"]
