"""Shared fixtures: SAM checkpoints saved from randomly initialised official models.

Checkpoints are written by ``segment_anything`` itself, so key names and shapes
are the real ones; only the values are random (no download ever happens).
"""

from __future__ import annotations

import os

import pytest
import torch

# Keep the suite single-process friendly on the 2-core CI machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The tiny SAM that the `tiny` presets of both paths map from: same modules as
# ViT-B, with embed_dim 64, 4 blocks, 2 heads, global attention in blocks 1 and 3.
TINY_SAM = {
    "encoder_embed_dim": 64,
    "encoder_depth": 4,
    "encoder_num_heads": 2,
    "encoder_global_attn_indexes": [1, 3],
}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def build_official_sam(**spec) -> torch.nn.Module:
    """A randomly initialised official ``segment_anything`` Sam with the given encoder shape."""
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    return _build_sam(checkpoint=None, **spec).eval()


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory) -> str:
    """Path of a tiny random SAM checkpoint in the official key format."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_random.pth"
    torch.save(build_official_sam(**TINY_SAM).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def vit_b_sam_checkpoint(tmp_path_factory) -> str:
    """Path of a random official ViT-B SAM checkpoint (375 MB on disk; built once)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    return str(path)
