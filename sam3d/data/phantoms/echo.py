"""Echocardiography-like 2D images (an apical view, CAMUS-style labels), seeded.

A sector-shaped field of view fans out from the probe at the top centre; inside it a
left-ventricle cavity (a bullet shape whose apex points at the probe), the myocardial
wall around it (open at the mitral plane) and the left atrium beyond the base. Blood is
dark, the myocardium bright, other tissue textured grey; the echo amplitude gets
multiplicative, spatially correlated Rayleigh speckle (the magnitude of smoothed complex
Gaussian noise) and exponential depth attenuation, then log compression.

Labels follow CAMUS: 0 background, 1 left-ventricle cavity, 2 myocardium, 3 left atrium.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sam3d.data.phantoms.common import smooth_field
from sam3d.errors import Sam3DError

ECHO_LABELS = {0: "background", 1: "left ventricle", 2: "myocardium", 3: "left atrium"}
ECHO_CLASS_NAMES = ("lv", "myo", "la")  # short names of labels 1, 2, 3 (metrics, CSV columns)


@dataclass
class EchoPhantom:
    """One apical echo image with its CAMUS-style label."""

    image: np.ndarray  # float32 (H, W) in [0, 1]
    label: np.ndarray  # uint8 (H, W): 0 bg, 1 LV cavity, 2 myocardium, 3 left atrium
    sector: np.ndarray  # bool (H, W): the field of view
    spacing_mm: tuple[float, float]  # (row, col) pixel size


def _wobble(rng: np.random.Generator, theta: np.ndarray, amount: float) -> np.ndarray:
    """A smooth random radial scale ``1 + ...`` of the angle (three low harmonics)."""
    out = np.ones_like(theta)
    for k in (2, 3, 4):
        out += amount / k * rng.normal() * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return out


def make_echo_phantom(
    seed: int, size: tuple[int, int] = (256, 256), depth_mm: float | None = None
) -> EchoPhantom:
    """An echo-like grey image of ``size`` (H, W) pixels with LV, myocardium and LA labels.

    ``depth_mm``: the imaging depth the sector radius spans (drawn in 130-170 mm when
    None); pixels are square, ``spacing_mm = depth_mm / radius_px``.
    """
    rng = np.random.default_rng(seed)
    h, w = int(size[0]), int(size[1])
    if h < 48 or w < 48:
        raise Sam3DError(f"echo phantom size must be at least 48 x 48, got {size}")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # Sector: probe just above the top centre, half-angle 35-40 degrees
    probe = np.array([-0.02 * h, (w - 1) / 2])
    radius = 0.97 * h
    half = np.deg2rad(rng.uniform(35, 40))
    r = np.hypot(yy - probe[0], xx - probe[1])
    ang = np.arctan2(xx - probe[1], yy - probe[0])
    sector = (r <= radius) & (np.abs(ang) <= half) & (r > 0.02 * h)

    # Left ventricle: base centre at 52-58 % depth, long axis tilted +-10 degrees
    tilt = np.deg2rad(rng.uniform(-10, 10))
    axis = np.array([-np.cos(tilt), np.sin(tilt)])  # base -> apex (towards the probe)
    normal = np.array([axis[1], -axis[0]])
    base = np.array([rng.uniform(0.52, 0.58) * h, (w - 1) / 2 + rng.uniform(-0.03, 0.03) * w])
    length = rng.uniform(0.33, 0.38) * h
    half_width = min(rng.uniform(0.11, 0.14) * h, np.tan(half) * 0.4 * h)
    wall = rng.uniform(0.035, 0.05) * h
    u = (yy - base[0]) * axis[0] + (xx - base[1]) * axis[1]  # along the axis, 0 at the base
    v = (yy - base[0]) * normal[0] + (xx - base[1]) * normal[1]
    theta = np.arctan2(v / half_width, u / length)
    shape = _wobble(rng, theta, 0.06)
    lv = (np.hypot(u / length, v / half_width) <= shape) & (u >= 0)
    outer = np.hypot(u / (length + wall), v / (half_width + wall)) <= shape
    myo = outer & (u >= 0) & ~lv
    # Left atrium beyond the mitral plane (a small gap of valve tissue), roughly elliptic
    gap = 0.012 * h
    la_a = rng.uniform(0.12, 0.15) * h  # along the axis
    la_b = rng.uniform(0.75, 0.9) * half_width
    la_u = u + gap + la_a
    la_v = v - rng.uniform(-0.1, 0.1) * half_width
    la_shape = _wobble(rng, np.arctan2(la_v / la_b, la_u / la_a), 0.05)
    la = (np.hypot(la_u / la_a, la_v / la_b) <= la_shape) & (u < -gap)

    label = np.zeros((h, w), dtype=np.uint8)
    label[lv] = 1
    label[myo] = 2
    label[la] = 3
    label[~sector] = 0

    # Echo amplitude: textured tissue, bright myocardium, dark blood
    tex = smooth_field(rng, (h, w), (1.0, 1.0), 0.06 * h)
    amp = 0.35 * (1.0 + 0.25 * tex)
    amp[myo] = 0.8 * (1.0 + 0.1 * tex[myo])
    amp[lv | la] = 0.05
    amp = ndimage.gaussian_filter(np.clip(amp, 0.02, None), 0.8)
    # Speckle: |smoothed complex Gaussian| is Rayleigh-distributed; normalised to mean 1
    sig = (0.6, 1.4)  # finer axially than laterally, as a real point-spread function
    c = ndimage.gaussian_filter(rng.standard_normal((h, w)), sig) + 1j * ndimage.gaussian_filter(
        rng.standard_normal((h, w)), sig
    )
    speckle = np.abs(c)
    speckle /= speckle.mean()
    attenuation = np.exp(-rng.uniform(0.8, 1.3) * r / radius)
    env = amp * speckle * attenuation
    img = np.log1p(20.0 * env) / np.log1p(20.0 * 1.5)  # log compression
    edge = np.clip((half - np.abs(ang)) / 0.03, 0, 1) * np.clip((radius - r) / 3.0, 0, 1)
    img = np.clip(img * edge, 0.0, 1.0) * sector
    depth = float(depth_mm) if depth_mm is not None else float(rng.uniform(130, 170))
    spacing = depth / radius
    return EchoPhantom(
        image=img.astype(np.float32), label=label, sector=sector, spacing_mm=(spacing, spacing)
    )
