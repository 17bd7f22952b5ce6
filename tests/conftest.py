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


def asymmetric_tiny_sam_state() -> dict[str, torch.Tensor]:
    """The tiny SAM's state dict with every position table non-zero and non-symmetric.

    A random official SAM starts its absolute position embedding and relative-position
    tables at zero, so a resize that zeroed them, or swapped h and w, would go unseen.
    Here ``pos_embed[0, i, j, c]`` is a smooth field that differs along i and j and per
    channel, and each block's ``rel_pos_h`` / ``rel_pos_w`` are different seeded ramps.
    """
    state = build_official_sam(**TINY_SAM).state_dict()
    pos = state["image_encoder.pos_embed"]  # 1 x 64 x 64 x C
    g, c = pos.shape[1], pos.shape[3]
    i = torch.arange(g, dtype=torch.float32)[:, None, None]
    j = torch.arange(g, dtype=torch.float32)[None, :, None]
    k = torch.arange(c, dtype=torch.float32)[None, None, :]
    field = torch.sin(0.11 * i * (1 + k / c)) + 0.5 * torch.cos(0.07 * j * (2 + k / c)) + 0.01 * i
    state["image_encoder.pos_embed"] = (field + 0.02 * k)[None]
    gen = torch.Generator().manual_seed(5)
    for key in [k for k in state if ".rel_pos_" in k]:
        rows, dim = state[key].shape
        ramp = torch.linspace(-1, 1, rows)[:, None] * torch.linspace(0.5, 2, dim)[None]
        state[key] = ramp + 0.3 * torch.randn(rows, dim, generator=gen)
    return state


@pytest.fixture(scope="session")
def asymmetric_tiny_sam_checkpoint(tmp_path_factory) -> str:
    """Path of :func:`asymmetric_tiny_sam_state` in the official key format."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny_asymmetric.pth"
    torch.save(asymmetric_tiny_sam_state(), path)
    return str(path)


@pytest.fixture(scope="session")
def vit_b_sam_checkpoint(tmp_path_factory) -> str:
    """Path of a random official ViT-B SAM checkpoint (375 MB on disk; built once)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def trained_tiny_sam3d_checkpoint(tmp_path_factory) -> str:
    """A tiny Sam3D trained for a few steps on one phantom, in the trained-checkpoint format.

    ``{"preset", "state_dict", "meta", "dataset"}`` as the kits bundle writes it, so
    ``load_sam3d_checkpoint`` and ``sam3d segment --checkpoint`` can rebuild it.
    """
    from sam3d.data.phantoms import make_ct_phantom
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.models import build_sam3d, save_sam3d_checkpoint

    torch.manual_seed(0)
    dataset = load_dataset_preset("kits")
    ph = make_ct_phantom(3, shape_vox=(48, 48, 40), spacing_mm=(1.0, 1.0, 1.0), n_lesions=1)
    lo, hi = dataset["window_hu"]
    image = (torch.as_tensor(ph.image_hu).clamp(lo, hi) - dataset["mean"]) / dataset["std"]
    target = torch.as_tensor(ph.label == dataset["tumour_label"]).long()
    centre = torch.nonzero(target).float().mean(0).round().long()
    model = build_sam3d("tiny")
    r = model.crop_size // 2  # small crops keep the fixture quick; any multiple of 4 works
    start = [int(min(max(c - r // 2, 0), s - r)) for c, s in zip(centre.tolist(), image.shape)]
    crop = tuple(slice(s, s + r) for s in start)
    x, y = image[crop][None, None], target[crop][None]
    click = (centre - torch.tensor(start)).float()[None, None]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x, click, torch.ones(1, 1).long()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("sam3d") / "model.pt"
    save_sam3d_checkpoint(model.eval(), path, meta={"steps": 2}, dataset=dataset)
    return str(path)


def run_bundle_workflow(bundle, configs, workflow_type, check=True, **overrides):
    """Run configs of ``bundle`` (a bundle folder) as ``python -m monai.bundle run`` does:
    its metadata and logging config, MONAI's property check (``check``), run, finalize."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(bundle / c) for c in configs],
        meta_file=str(bundle / "metadata.json"),
        logging_file=str(bundle / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )
    wf.initialize()
    if check:
        assert wf.check_properties() == []
    wf.run()
    wf.finalize()
    return wf
