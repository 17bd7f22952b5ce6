"""The embedded end-to-end demo: ``sam3d demo --out DIR``.

A list of steps run in order over one shared :class:`DemoState`; each step logs
one short line per thing it does and records what it wrote in
``state.outputs``. To add a step, write ``def step_x(state: DemoState) -> None``
and put ``("x", step_x)`` into :data:`STEPS` at its place.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

# Phantom CT cases of the demo: 18 for training, 6 for validation, 6 never seen (test), one
# lesion (10-60 mm) each, the splits balanced by lesion contrast (bright / dark).
DEMO_N_CASES = 30
DEMO_SHAPE_VOX = (96, 96, 48)
DEMO_SPACING_MM = (1.5, 1.5, 2.5)
# How many held-out (test) cases the segment step clicks on.
DEMO_SEGMENT_CASES = 3


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
    state.log(
        f"generating {DEMO_N_CASES} CT phantoms of {DEMO_SHAPE_VOX} voxels at {DEMO_SPACING_MM} mm"
    )
    path = write_phantom_dataset(
        "ct", folder, n=DEMO_N_CASES, seed=state.seed, progress=True, shape_vox=DEMO_SHAPE_VOX,
        spacing_mm=DEMO_SPACING_MM, n_lesions=1, balance_contrast=True,
    )  # fmt: skip
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


# The demo's training: the kits bundle, tiny preset on the kits 1 mm grid (32 mm windows,
# grown in validation and segmentation), from random initialisation with every weight
# trainable, cosine-decayed learning rate. About 1,000 steps of batch 2: some 4 minutes on
# a quiet 2-core CPU.
# The recipe the demo's figures were measured with (0.840 before, 0.827 with the
# one-resampling augmentation): 3DSAM-adapter's random training clicks (no simulated
# corrections, no mask prompt) and the bundle's earlier, milder augmentation. The
# interactive recipe, the bundle's default, has not yet been measured to learn within the
# demo's budget (docs/BENCHMARKS.md, issue 23).
DEMO_AUGMENTATION = {
    "zoom_prob": 0.3,
    "zoom_range": (0.9, 1.1),
    "flip_prob": 0.2,
    "rot90_prob": 0.2,
    "rotate_prob": 0.0,
    "scale_prob": 0.0,
    "gamma_prob": 0.0,
    "noise_prob": 0.0,
    "smooth_prob": 0.0,
}
DEMO_TRAIN = {
    "click_training": "reference",
    "augmentation": DEMO_AUGMENTATION,
    "max_epochs": 56,
    "batch_size": 2,
    "samples_per_volume": 2,
    "learning_rate": 4e-4,
    "val_interval": 2,
    "spacing_mm": 1.0,  # the demo's recipe: its phantoms on the kits 1 mm grid
    "val_clicks": 0,  # one click per validation case (the click curve is for longer runs)
}


def _progress_handlers(state: DemoState, max_epochs: int, n_iters: int) -> tuple[Any, list]:
    """The learning curve (running loss, validation Dice); the bundle's own
    ``sam3d.engine.ProgressBar`` draws the bar."""
    from ignite.engine import Events

    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    running: dict[str, float] = {}

    def on_iteration(engine: Any) -> None:
        loss = (
            float(engine.state.output[0]["loss"])
            if isinstance(engine.state.output, list)
            else float(engine.state.output["loss"])
        )
        running["loss"] = loss if "loss" not in running else 0.9 * running["loss"] + 0.1 * loss

    def on_epoch(engine: Any) -> None:
        metrics = engine.state.metrics
        point = {
            "epoch": float(engine.state.epoch),
            "minutes": (time.perf_counter() - t0) / 60,
            "train_loss": float(metrics.get("train_loss", running.get("loss", float("nan")))),
        }
        if running.get("val_epoch") == engine.state.epoch:
            point["val_dice"] = float(running["val_dice_value"])
        curve.append(point)

    def on_validation(evaluator: Any, trainer: Any) -> None:
        dice = float(evaluator.state.metrics.get("val_mean_dice", float("nan")))
        running["dice"] = f"{dice:.3f}"
        running["val_dice_value"], running["val_epoch"] = dice, trainer.state.epoch

    def attach(trainer: Any, evaluator: Any) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, on_iteration)
        # after the ValidationHandler (attached first) has run the evaluator
        trainer.add_event_handler(Events.EPOCH_COMPLETED, on_epoch)
        evaluator.add_event_handler(Events.COMPLETED, lambda e: on_validation(e, trainer))

    return attach, curve


def save_learning_curve(curve: list[dict[str, float]], path: Path) -> Path:
    """PNG: training loss and validation Dice against training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sam3d.data.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    minutes = [p["minutes"] for p in curve]
    ax.plot(minutes, [p["train_loss"] for p in curve], color="tab:blue", label="training loss")
    ax.set_xlabel("training time (wall-clock minutes)")
    ax.set_ylabel("DiceCE loss", color="tab:blue")
    val = [(p["minutes"], p["val_dice"]) for p in curve if "val_dice" in p]
    twin = ax.twinx()
    if val:
        twin.plot(*zip(*val), "o-", color="tab:orange", label="validation Dice (1 click)")
    twin.set_ylim(0, 1)
    twin.set_ylabel("validation Dice, one click", color="tab:orange")
    ax.set_title("sam3d demo: tiny preset on CT phantoms")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def step_train(state: DemoState) -> None:
    """Train the kits bundle on the demo's phantoms (tiny preset, CPU-sized).

    The same recipe a user runs (``python -m monai.bundle run --config_file
    bundles/kits/train.json``) with overrides, into ``out/kits_bundle_run``: checkpoints
    in ``models/``, MLflow store and executed config in ``eval/``; a progress bar with the
    running loss and the validation Dice (one click on each of the held-out validation
    cases, scored on the clicked lesion, windows grown as in ``sam3d segment``); the
    curve in ``learning_curve.png``. ``state.extras["train"]`` overrides
    :data:`DEMO_TRAIN` keys (e.g. ``{"max_epochs": 1}``).
    """
    import torch
    from monai.bundle import ConfigWorkflow

    from sam3d.models.checkpoint import read_checkpoint
    from sam3d.presets import BUNDLE_DIR

    settings = {**DEMO_TRAIN, **state.extras.get("train", {})}
    if "train_epochs" in state.extras:
        settings["max_epochs"] = int(state.extras["train_epochs"])
    settings["val_interval"] = min(int(settings["val_interval"]), int(settings["max_epochs"]))
    root = state.out / "kits_bundle_run"
    threads = torch.get_num_threads()
    if os.getloadavg()[0] > (os.cpu_count() or 1):  # a busy CPU: one thread is faster
        torch.set_num_threads(1)
    state.log(
        f"training the kits bundle (tiny preset, {settings['max_epochs']} epochs, "
        f"lr {settings['learning_rate']:g} cosine) into {root}; load {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    )
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_DIR / "kits" / "train.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(state.outputs["dataset_json"].parent),
        preset="tiny",
        num_workers=0,
        seed=state.seed,
        resume=False,
        **settings,
    )
    t0 = time.perf_counter()
    try:
        workflow.initialize()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        evaluator = workflow.parser.get_parsed_content("validate#evaluator")
        attach, curve = _progress_handlers(
            state, int(settings["max_epochs"]), len(trainer.data_loader)
        )
        attach(trainer, evaluator)
        workflow.run()
        workflow.finalize()
    finally:
        torch.set_num_threads(threads)
    checkpoint = root / "models" / "model.pt"
    last = read_checkpoint(root / "models" / "last.pt", "resume checkpoint")
    state.log(
        f"trained {trainer.state.iteration} steps in {time.perf_counter() - t0:.0f} s; best "
        f"validation Dice {last['best_metric']:.3f} at epoch {last['best_epoch']} "
        f"({len(evaluator.data_loader)} held-out validation cases, one click each)"
    )
    curve_path = save_learning_curve(curve, state.out / "learning_curve.png")
    state.extras["learning_curve"] = curve
    state.outputs["checkpoint"] = checkpoint
    state.outputs["learning_curve"] = curve_path
    state.log(f"wrote {checkpoint}, {root / 'models' / 'last.pt'} and {curve_path}")


def _click_in(lesion: np.ndarray) -> tuple[int, int, int]:
    """The voxel deepest inside a lesion mask (where a user would click)."""
    depth = ndimage.distance_transform_edt(lesion)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(depth)), depth.shape))


def step_segment(state: DemoState) -> None:
    """Segment held-out (test) phantoms from one click each with the trained model.

    :data:`DEMO_SEGMENT_CASES` cases of the test split (never seen in training or
    validation); one click deep inside the largest lesion; ``sam3d segment``'s code
    (:func:`sam3d.inference.segment.segment_file`, windows grown up to 96 mm;
    ``state.extras["segment_growth"]`` overrides). Prints Dice and NSD (5 mm) against the
    phantom's lesion and writes each mask and preview.
    """
    from sam3d.data.io import load_image_label, spacing_from_affine
    from sam3d.inference import WindowGrowth
    from sam3d.inference.segment import segment_file
    from sam3d.metrics.surface import compute_surface_dice

    checkpoint = state.outputs.get("checkpoint")
    if checkpoint is None:
        if all(name != "train" for name, _ in STEPS):
            state.log("no train step yet: nothing to segment with, skipped")
            return
        raise RuntimeError("the segment step needs state.outputs['checkpoint'] from the train step")
    dataset_json = state.outputs["dataset_json"]
    meta = json.loads(dataset_json.read_text())
    scores = []
    for entry in meta["test"]:
        if len(scores) == int(state.extras.get("segment_cases", DEMO_SEGMENT_CASES)):
            break
        image_path = dataset_json.parent / entry["image"]
        image, label = load_image_label(image_path, dataset_json.parent / entry["label"])
        tumour = label[0].numpy() == 2
        if not tumour.any():
            continue
        components, n = ndimage.label(tumour, structure=np.ones((3, 3, 3)))
        sizes = ndimage.sum_labels(tumour, components, range(1, n + 1))
        lesion = components == 1 + int(np.argmax(sizes))
        click = _click_in(lesion)
        stem = image_path.name.removesuffix(".nii.gz")
        mask_path = state.out / f"segment_{stem}.nii.gz"
        preview_path = state.out / f"segment_{stem}.png"
        session = segment_file(
            image_path,
            checkpoint,
            mask_path,
            clicks=[click],
            preview=preview_path,
            growth=state.extras.get("segment_growth", WindowGrowth(max_extent_mm=96.0)),
        )
        mask = session.mask_numpy().astype(bool)
        dice = 2 * float((mask & lesion).sum()) / max(1.0, float(mask.sum() + lesion.sum()))
        spacing = spacing_from_affine(image.affine)
        nsd = float(compute_surface_dice(torch_bool(mask), torch_bool(lesion), spacing, 5.0))
        scores.append((dice, nsd))
        state.log(
            f"{image_path.name}: one click at voxel {click}: Dice {dice:.3f}, NSD@5mm {nsd:.3f} "
            f"({int(mask.sum())} voxels predicted, {int(lesion.sum())} in the lesion)"
        )
        state.outputs[f"segment_{stem}"] = mask_path
        state.outputs[f"preview_{stem}"] = preview_path
        state.extras.setdefault("segment_clicks", []).append((image_path, click))
    if not scores:
        raise RuntimeError("no test phantom has a tumour to click on")
    dice = float(np.mean([d for d, _ in scores]))
    nsd = float(np.mean([s for _, s in scores]))
    state.extras["segment_scores"] = scores
    state.log(
        f"held-out single-click tumour Dice {dice:.3f}, NSD@5mm {nsd:.3f} "
        f"(mean of {len(scores)} test cases never seen in training)"
    )


def torch_bool(array: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.bool)


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
