"""Topology-preserving skeletonisation of 2D and 3D binary masks in PyTorch (GPU capable).

Parallel directional thinning with subfields:

- a *pass* runs a few sub-iterations; in each, the candidates are foreground border
  points open towards the sub-iteration's sides: in 3D the two faces of one axis, axis
  after axis (Lee et al. 1994, the algorithm of scikit-image's 3D ``skeletonize``, peels
  the six faces one at a time); in 2D Zhang-Suen's two sides (south/east, then
  north/west), as scikit-image's 2D one;
- points that are *end points* (exactly one foreground neighbour) when the candidates
  are collected are kept, so curve ends survive;
- the candidates are split into the 2^d *subfields* of equal coordinate parities.
  Two points of one subfield are never neighbours, so deleting every simple point
  of a subfield at once is the same as deleting them one after another: topology
  (components, cavities, tunnels; 2D: components and holes) is preserved exactly;
- passes repeat until nothing changes. The result is thin: every remaining point
  is an end point or not simple (e.g. no 2x2 / 2x2x2 block survives).

Simple points (26/6 connectivity in 3D, 8/4 in 2D; Bertrand & Malandain 1994): the
foreground neighbours form exactly one 26-component (2D: 8-component), and the
background points of the 18-neighbourhood (2D: 8-neighbourhood) that are 6-connected
(2D: 4-connected) to a face neighbour form exactly one 6-component (2D: 4-component).
Both counts are computed for all candidates at once by propagating a seed through the
fixed neighbour adjacency matrix with small matrix products; in 2D the 256 answers are
tabulated once.

How it differs from scikit-image: skimage's 2D ``skeletonize`` is Zhang-Suen's
parallel thinning with a fixed lookup table of deletable 3x3 patterns (which is not
topology-preserving in every case, e.g. it can erase a 2x2 square); here the same two
sides are peeled but a point goes only if it is simple. Its 3D one is Lee's algorithm,
which collects the simple border points of one direction and then re-checks them one
at a time in scan order (sequential, CPU only); here that re-check is replaced by the
subfield split, which makes every step a dense parallel operation. The skeletons
differ where ties are broken (a voxel here and there), not in topology or thinness;
clDice computed with either agrees within 0.02 on the vessel and tube phantoms of
tests/test_cldice.py.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch

from sam3d.metrics.surface import as_binary

__all__ = ["is_simple", "skeletonize"]


@lru_cache(maxsize=2)
def _geometry(d: int) -> dict[str, torch.Tensor]:
    """Neighbour offsets and the adjacency matrices used by the simple-point test."""
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=d) if any(o)]
    off = torch.tensor(offsets)  # K x d
    cheb = (off[:, None, :] - off[None, :, :]).abs().amax(-1)
    l1 = (off[:, None, :] - off[None, :, :]).abs().sum(-1)
    norm1 = off.abs().sum(-1)
    return {
        "offsets": off,
        "adj_fg": (cheb == 1).float(),  # 8- / 26-adjacency
        "adj_bg": (l1 == 1).float(),  # 4- / 6-adjacency
        # background is looked at in N8 (2D) / N18 (3D)
        "bg_zone": (norm1 <= (2 if d == 3 else d)),
        "face": norm1 == 1,
    }


def _reach(seed: torch.Tensor, allowed: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """Points of ``allowed`` (``M x K`` float 0/1) connected to ``seed`` through ``adj``."""
    cur = seed
    for step in range(adj.shape[0]):
        nxt = torch.clamp(cur + (cur @ adj) * allowed, max=1.0)
        if step % 2 == 1 and torch.equal(nxt, cur):
            break
        cur = nxt
    return cur


def _first(mask: torch.Tensor) -> torch.Tensor:
    """One-hot ``M x K`` of the first set position of each row (all zero if none)."""
    first = torch.zeros_like(mask)
    idx = mask.float().argmax(1, keepdim=True)
    first.scatter_(1, idx, 1.0)
    return first * mask.any(1, keepdim=True)


def is_simple(neighbours: torch.Tensor) -> torch.Tensor:
    """Simple-point test from the neighbourhood bits.

    Args:
        neighbours: ``M x K`` bool, K = 8 (2D) or 26 (3D), in the order of
            ``itertools.product((-1, 0, 1), repeat=d)`` without the centre.

    Returns:
        ``M`` bool: deleting the centre changes no topology.
    """
    d = 2 if neighbours.shape[1] == 8 else 3
    g = _geometry(d)
    dev = neighbours.device
    fg = neighbours.float()
    bg = (~neighbours & g["bg_zone"].to(dev)).float()
    face_bg = bg * g["face"].to(dev)
    # both propagations in one product: [fg | bg] through blockdiag(adj_fg, adj_bg)
    adj = torch.block_diag(g["adj_fg"], g["adj_bg"]).to(dev)
    seed = torch.cat([_first(fg), _first(face_bg)], 1)
    reached = _reach(seed, torch.cat([fg, bg], 1), adj)
    k = fg.shape[1]
    one_fg = (reached[:, :k] == fg).all(1) & neighbours.any(1)
    one_bg = (reached[:, k:] >= face_bg).all(1) & (face_bg.sum(1) > 0)
    return one_fg & one_bg


@lru_cache(maxsize=4)
def _lut_2d(device: str) -> torch.Tensor:
    """Simple-point test for all 256 8-neighbourhoods."""
    codes = torch.arange(256)
    bits = ((codes[:, None] >> torch.arange(8)) & 1).bool()
    return is_simple(bits).to(device)


@lru_cache(maxsize=2)
def _lut_3d(device: str) -> torch.Tensor:
    """Simple-point test for all 2^26 26-neighbourhoods (64 MB), built once per device.

    Used on CUDA, where it takes well under a second and makes every sub-iteration a
    fixed sequence of kernels without host syncs; on the CPU it would take about a
    minute, so the CPU memoises tests in :class:`_SimpleCache` instead.
    """
    dev = torch.device(device)
    out = torch.empty(1 << 26, dtype=torch.bool, device=dev)
    shifts = torch.arange(26, device=dev)
    chunk = 1 << 22
    for start in range(0, 1 << 26, chunk):
        codes = torch.arange(start, start + chunk, device=dev)
        out[start : start + chunk] = is_simple(((codes[:, None] >> shifts) & 1).bool())
    return out


class _SimpleCache:
    """Memo of the 3D simple-point test by 26-bit neighbourhood code, per device.

    Thinning meets the same few thousand configurations again and again; after the
    first passes nearly every test is one ``searchsorted`` instead of a propagation.
    """

    def __init__(self) -> None:
        self.codes: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def __call__(self, codes: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        key = str(codes.device)
        known = self.codes.get(key)
        if known is None:
            known = torch.empty(0, dtype=torch.long, device=codes.device)
            self.values[key] = torch.empty(0, dtype=torch.bool, device=codes.device)
        pos = torch.searchsorted(known, codes).clamp(max=max(known.numel() - 1, 0))
        hit = known[pos] == codes if known.numel() else torch.zeros_like(codes, dtype=torch.bool)
        if not bool(hit.all()):
            new, first = _unique_first(codes[~hit])
            new_vals = is_simple(bits[~hit][first])
            all_codes = torch.cat([known, new])
            order = torch.argsort(all_codes)
            self.codes[key] = known = all_codes[order]
            self.values[key] = torch.cat([self.values[key], new_vals])[order]
            pos = torch.searchsorted(known, codes)
        return self.values[key][pos]


def _unique_first(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of ``x`` and the index of one occurrence of each."""
    uniq, inverse = torch.unique(x, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(x.numel(), device=x.device), "amin")
    return uniq, first


_simple_3d = _SimpleCache()


def _groups(d: int) -> list[list[list[tuple[int, ...]]]]:
    """Sub-iterations of a pass: each is a list of tests, each test a list of directions
    whose neighbours must all be background for a point to be a candidate.

    3D: one axis at a time, both of its faces (3 sub-iterations; Lee's six one-face
    sub-iterations give the same clDice agreement at twice the steps). 2D: Zhang-Suen's
    two, south or east or (north and west) open, then north or west or (south and east).
    """
    if d == 2:
        s, e, n, w = (1, 0), (0, 1), (-1, 0), (0, -1)
        return [[[s], [e], [n, w]], [[n], [w], [s, e]]]
    face = [[tuple(v if k == a else 0 for k in range(d)) for v in (-1, 1)] for a in range(d)]
    return [[[lo], [hi]] for lo, hi in face]


def skeletonize(
    mask: torch.Tensor, spatial_dims: int | None = None, full_table: bool | None = None
) -> torch.Tensor:
    """Topology-preserving skeleton of binary masks.

    Args:
        mask: bool or 0/1 tensor ``spatial`` or ``... x spatial`` (leading dims are a batch),
            on any device.
        spatial_dims: 2 or 3; default ``mask.ndim`` (so give it for batched input).
        full_table: 3D only: look simple points up in a table of all 2^26
            neighbourhoods (sync-free sub-iterations; built once per device) instead
            of the memoised test. Default: on CUDA. Same result either way.

    Returns:
        bool tensor of the same shape: a thin (one voxel wide) skeleton with the same
        connected components and holes/cavities as ``mask`` and its end points kept.
    """
    d = spatial_dims or mask.ndim
    if d not in (2, 3) or mask.ndim < d:
        raise ValueError(f"skeletonize needs 2D or 3D masks, got shape {tuple(mask.shape)}")
    lead = mask.shape[: mask.ndim - d]
    spatial = mask.shape[mask.ndim - d :]
    x = as_binary(mask).reshape(-1, *spatial)
    dev = x.device
    full_shape = x.shape
    box = _bounding_box(x)
    if box is None:
        return x.clone().reshape(*lead, *spatial)
    x = x[(slice(None), *box)]
    x = torch.nn.functional.pad(x.to(torch.uint8), [1, 1] * d).bool()
    shape = x.shape
    strides = torch.tensor(x.stride(), device=dev)
    g = _geometry(d)
    off_flat = (g["offsets"].to(dev) * strides[1:]).sum(1)  # no integer matmul on CUDA
    pow2 = (1 << torch.arange(off_flat.numel(), device=dev)).long()
    if d == 2:
        lut = _lut_2d(str(dev))
    elif full_table if full_table is not None else dev.type == "cuda":
        lut = _lut_3d(str(dev))
    else:
        lut = None
    flat = x.reshape(-1)
    groups = _groups(d)
    n_sub = 1 << d
    dims = list(range(1, d + 1))
    # Few host syncs (they dominate on a GPU): one nonzero per side, one "anything
    # deleted?" per pass; without a full table also one split per side and one cache
    # check per subfield.
    while True:
        deleted = torch.zeros((), dtype=torch.long, device=dev)
        for group in groups:
            xs = flat.reshape(shape)
            border = torch.zeros_like(xs)
            for test in group:
                open_ = xs.clone()
                for direction in test:
                    open_ &= ~torch.roll(xs, shifts=[-s for s in direction], dims=dims)
                border |= open_
            cand = torch.nonzero(border.reshape(-1)).flatten()
            if cand.numel() == 0:
                continue
            # end points are judged once, when the candidates are collected (as in Lee's
            # algorithm); simplicity is judged on the current image, subfield by subfield
            keep = flat[cand[:, None] + off_flat[None, :]].sum(1) == 1
            sub = torch.zeros_like(cand)  # subfield = parities of the coordinates
            for k in range(d, 0, -1):
                sub = sub * 2 + (cand // strides[k]) % shape[k] % 2
            sub = torch.where(keep, n_sub, sub)  # end points: a subfield never visited
            if lut is not None:
                # with a full table: masks instead of splits, no host sync per subfield
                for sf in range(n_sub):
                    bits = flat[cand[:, None] + off_flat[None, :]]
                    deletable = lut[(bits.long() * pow2).sum(1)] & (sub == sf)
                    flat[cand] = flat[cand] & ~deletable
                    deleted += deletable.sum()
                continue
            order = torch.argsort(sub)
            counts = torch.bincount(sub, minlength=n_sub + 1).tolist()
            for idx in cand[order].split(counts)[:n_sub]:
                if idx.numel() == 0:
                    continue
                bits = flat[idx[:, None] + off_flat[None, :]]
                codes = (bits.long() * pow2).sum(1)
                deletable = _simple_3d(codes, bits)
                flat[idx] = ~deletable  # every idx is foreground: keep the non-deletable
                deleted += deletable.sum()
        if int(deleted) == 0:
            break
    x = flat.reshape(shape)
    out = torch.zeros(full_shape, dtype=torch.bool, device=dev)
    out[(slice(None), *box)] = x[(slice(None), *(slice(1, -1) for _ in range(d)))]
    return out.reshape(*lead, *spatial)


def _bounding_box(x: torch.Tensor) -> list[slice] | None:
    """Slices of the union bounding box of ``N x spatial`` masks over all items, or None."""
    union = x.any(0)
    box = []
    for axis in range(union.ndim):
        proj = union.flatten(0, axis - 1).any(0) if axis else union
        proj = proj.flatten(1).any(1) if proj.ndim > 1 else proj
        idx = torch.nonzero(proj).flatten()
        if idx.numel() == 0:
            return None
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return box
