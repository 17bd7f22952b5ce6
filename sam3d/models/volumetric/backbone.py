"""The seam between :class:`~sam3d.models.volumetric.sam3d.Sam3D` and its image encoder.

``Sam3D`` composes any :class:`VolumeEncoder`: the prompt encoder and the decoder only see
its multi-scale maps, and the builder only calls the methods below. SAM's 3D-adapted ViT
(:class:`~sam3d.models.volumetric.encoder3d.ImageEncoder3D`) is the first one; another
backbone (SAM-Med3D's 3D ViT, SAM 2's Hiera) is one new file implementing this interface
plus a builder that composes ``Sam3D(encoder, prompt_encoder, decoder, ...)``.

The contract, for a crop ``x`` of ``B x 1 x H x W x D`` (already windowed and z-scored;
sides multiples of ``voxels_per_token``):

- ``forward(x)`` returns ``num_levels`` maps, shallow to deep, each
  ``B x out_channels x H/v x W/v x D/v`` (``v = voxels_per_token``). The last one is the
  map the clicks prompt (:class:`~sam3d.models.volumetric.prompt3d.PromptEncoder3D`);
  all go to :class:`~sam3d.models.volumetric.decoder3d.MLADecoder3D`, which resamples
  every level to ``H/2`` itself, so any ``v`` works.
- ``voxels_per_token``, ``out_channels``, ``num_levels``: ints, fixed at construction.
- ``read_pretrained(path)`` reads a pre-trained checkpoint file into a state dict
  (default: an official SAM checkpoint, :func:`sam3d.models.sam.checkpoint.load_sam_state_dict`,
  ``weights_only``).
- ``load_pretrained(state)`` copies the weights it uses into the encoder, refusing a
  checkpoint of another shape with :class:`~sam3d.errors.Sam3DError`, and returns a
  :class:`~sam3d.models.sam.checkpoint.LoadReport` (``used`` / ``ignored``: checkpoint
  keys; ``new``: encoder parameter names, relative to the encoder, left initialised).
- ``freeze_pretrained()`` freezes the weights that came from the checkpoint (the
  anchor's recipe); everything else stays trainable.
- ``set_reference(enabled)`` (optional) switches to a slow reference formulation for
  parity tests; the default does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from sam3d.models.sam.checkpoint import LoadReport, load_sam_state_dict


class VolumeEncoder(nn.Module):
    """Base class of Sam3D's image encoders (the interface of this module's docstring)."""

    voxels_per_token: int
    out_channels: int
    num_levels: int

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``B x 1 x H x W x D`` -> ``num_levels`` maps ``B x out_channels x H/v x W/v x D/v``."""
        raise NotImplementedError

    def read_pretrained(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        """A pre-trained checkpoint as a state dict (default: an official SAM checkpoint)."""
        return load_sam_state_dict(path)

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> LoadReport:
        """Copy the checkpoint's weights in; the report names encoder-relative parameters."""
        raise NotImplementedError

    def freeze_pretrained(self) -> None:
        """Freeze the parameters that come from the pre-trained checkpoint."""
        raise NotImplementedError

    def set_reference(self, enabled: bool) -> None:
        """Run a slow reference formulation (parity tests); no-op unless overridden."""
