"""The embedded end-to-end demo: ``sam3d demo --out DIR``.

A list of steps run in order over one shared :class:`DemoState`; each step logs
one short line per thing it does and records what it wrote in
``state.outputs``. To add a step, write ``def step_x(state: DemoState) -> None``
and put ``("x", step_x)`` into :data:`STEPS` at its place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

# Phantom CT cases of the demo: small enough to be quick on a laptop CPU.
DEMO_N_CASES = 6
DEMO_SHAPE_VOX = (160, 160, 48)


@dataclass
class DemoState:
    """What the steps share: the output folder, the seed, and what was written so far."""

    out: Path
    seed: int = 0
    outputs: dict[str, Path] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[demo] {message}", flush=True)


def step_phantoms(state: DemoState) -> None:
    """A small synthetic abdominal CT dataset with an MSD-style dataset.json."""
    from sam3d.data.phantoms import write_phantom_dataset

    folder = state.out / "phantoms_ct"
    state.log(f"generating {DEMO_N_CASES} CT phantoms of {DEMO_SHAPE_VOX} voxels")
    path = write_phantom_dataset(
        "ct", folder, n=DEMO_N_CASES, seed=state.seed, progress=True, shape_vox=DEMO_SHAPE_VOX
    )
    state.outputs["dataset_json"] = path
    state.log(f"wrote {folder}/imagesTr, {folder}/labelsTr and {path}")


def step_preview(state: DemoState) -> None:
    """A picture of the first case with a lesion: three slices through the lesion."""
    from sam3d.data.io import load_image_label, spacing_from_affine
    from sam3d.visualize import save_overlay_png

    dataset_json = state.outputs["dataset_json"]
    meta = json.loads(dataset_json.read_text())
    entries = meta["training"] + meta["validation"] + meta["test"]
    chosen = None
    for entry in entries:
        image, label = load_image_label(
            dataset_json.parent / entry["image"], dataset_json.parent / entry["label"]
        )
        lab = label[0].numpy()
        if chosen is None or (lab == 2).any():
            chosen = (entry, image[0].numpy(), lab, spacing_from_affine(image.affine))
        if (lab == 2).any():
            break
    entry, img, lab, spacing = chosen
    target = lab == 2 if (lab == 2).any() else lab > 0
    center = None
    if target.any():  # centre of the largest lesion (or organ)
        components, n = ndimage.label(target)
        largest = 1 + int(np.argmax(ndimage.sum_labels(target, components, range(1, n + 1))))
        center = np.argwhere(components == largest).mean(axis=0)
    path = state.out / "preview_phantom.png"
    save_overlay_png(
        img,
        lab,
        path,
        center_vox=center,
        spacing_mm=spacing,
        title=f"{Path(entry['image']).name}: kidney (cyan), tumour (yellow)",
    )
    state.outputs["preview_phantom"] = path
    state.log(f"wrote {path}")


# The demo's training: the kits bundle, tiny preset, briefly (about two minutes on a laptop CPU).
DEMO_TRAIN_EPOCHS = 6


def step_train(state: DemoState) -> None:
    """Train the kits bundle briefly on the demo's phantoms (tiny preset, CPU-sized).

    The same command a user runs (``python -m monai.bundle run --config_file
    bundles/kits/train.json``) with overrides, into ``out/kits_bundle_run``: checkpoints
    in ``models/``, MLflow store and executed config in ``eval/``.
    """
    import torch
    from monai.bundle import run

    from sam3d.presets import BUNDLE_DIR

    config = BUNDLE_DIR / "kits" / "train.json"
    root = state.out / "kits_bundle_run"
    epochs = int(state.extras.get("train_epochs", DEMO_TRAIN_EPOCHS))
    state.log(f"training the kits bundle (tiny preset, {epochs} epochs) into {root}")
    run(
        config_file=str(config),
        logging_file=False,
        bundle_root=str(root),
        dataset_dir=str(state.outputs["dataset_json"].parent),
        preset="tiny",
        max_epochs=epochs,
        batch_size=2,
        samples_per_volume=2,
        num_workers=0,
        seed=state.seed,
        resume=False,
    )
    checkpoint = root / "models" / "model.pt"
    last = torch.load(root / "models" / "last.pt", map_location="cpu", weights_only=True)
    state.log(
        f"best validation Dice {last['best_metric']:.3f} at epoch {last['best_epoch']}; "
        f"MLflow store {root / 'eval' / 'mlruns.db'}"
    )
    state.outputs["checkpoint"] = checkpoint
    state.log(f"wrote {checkpoint} and {root / 'models' / 'last.pt'}")


def step_segment(state: DemoState) -> None:
    """Segment a held-out phantom from one click inside its tumour with the trained model.

    Windows grow up to 96 mm (phantom lesions are at most 60 mm across);
    ``state.extras["segment_growth"]`` (a ``WindowGrowth``) overrides that.
    """
    from sam3d.data.io import load_image_label
    from sam3d.inference import WindowGrowth
    from sam3d.inference.segment import segment_file

    checkpoint = state.outputs.get("checkpoint")
    if checkpoint is None:
        if all(name != "train" for name, _ in STEPS):
            state.log("no train step yet: nothing to segment with, skipped")
            return
        raise RuntimeError("the segment step needs state.outputs['checkpoint'] from the train step")
    dataset_json = state.outputs["dataset_json"]
    meta = json.loads(dataset_json.read_text())
    held_out = meta["test"] + meta["validation"] + meta["training"]
    for entry in held_out:  # the first held-out case with a tumour
        image_path = dataset_json.parent / entry["image"]
        _, label = load_image_label(image_path, dataset_json.parent / entry["label"])
        tumour = label[0].numpy() == 2
        if tumour.any():
            break
    else:
        raise RuntimeError("no phantom has a tumour to click on")
    # the click: the tumour voxel deepest inside the largest lesion
    components, n = ndimage.label(tumour)
    largest = components == 1 + int(
        np.argmax(ndimage.sum_labels(tumour, components, range(1, n + 1)))
    )
    depth = ndimage.distance_transform_edt(largest)
    click = tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), depth.shape))
    mask_path = state.out / "segment_mask.nii.gz"
    preview_path = state.out / "segment_preview.png"
    state.log(f"segmenting {image_path.name} from one click at voxel {click}")
    session = segment_file(
        image_path,
        checkpoint,
        mask_path,
        clicks=[click],
        preview=preview_path,
        growth=state.extras.get("segment_growth", WindowGrowth(max_extent_mm=96.0)),
    )
    mask = session.mask_numpy().astype(bool)
    dice = 2 * (mask & tumour).sum() / max(1, mask.sum() + tumour.sum())
    state.log(f"tumour Dice against the phantom's label: {dice:.3f} ({int(mask.sum())} voxels)")
    state.extras["segment_case"], state.extras["segment_click"] = image_path, click
    state.outputs["segment_mask"] = mask_path
    state.outputs["segment_preview"] = preview_path
    state.log(f"wrote {mask_path} and {preview_path}")


Step = Callable[[DemoState], None]
STEPS: list[tuple[str, Step]] = [
    ("phantoms", step_phantoms),
    ("preview", step_preview),
    ("train", step_train),
    ("segment", step_segment),
]


def run_demo(
    out: Path | str, seed: int = 0, steps: list[tuple[str, Step]] | None = None
) -> DemoState:
    """Run the demo steps in order into ``out``; returns the state with what was written."""
    state = DemoState(out=Path(out), seed=seed)
    state.out.mkdir(parents=True, exist_ok=True)
    steps = STEPS if steps is None else steps
    for number, (name, step) in enumerate(steps, start=1):
        state.log(f"step {number}/{len(steps)}: {name}")
        t0 = time.perf_counter()
        step(state)
        state.log(f"step {name} done in {time.perf_counter() - t0:.1f} s")
    state.log("outputs: " + ", ".join(f"{k}={v}" for k, v in state.outputs.items()))
    return state
