"""Click segmentation of NIfTI volumes: grid mapping, windows, interactive sessions, batches."""

from sam3d.inference.grid import (
    ClicksToGridd,
    LoadVolumed,
    invert_to_original,
    original_to_grid,
    preprocessing,
    save_mask,
)
from sam3d.inference.session import (
    ClickSession,
    default_device,
    load_model_for_inference,
    resolve_dataset,
    session_bytes_estimate,
    window_bytes,
)
from sam3d.inference.windows import WindowGrowth, WindowPredictor

__all__ = [
    "ClickSession",
    "ClicksToGridd",
    "LoadVolumed",
    "WindowGrowth",
    "WindowPredictor",
    "default_device",
    "invert_to_original",
    "load_model_for_inference",
    "original_to_grid",
    "preprocessing",
    "resolve_dataset",
    "save_mask",
    "session_bytes_estimate",
    "window_bytes",
]
