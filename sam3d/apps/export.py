"""``sam3d bundle export``: a training run -> a MONAI model-zoo bundle with its weights.

A *run* is the bundle root a training wrote (``models/model.pt`` in the trained-checkpoint
format of :mod:`sam3d.models.checkpoint`, and ``eval/config_executed.json`` when the run
saved it). The exported bundle has the zoo's layout::

    configs/metadata.json   the source bundle's metadata; eval_metrics from the run; a
                            "sam3d" entry {"model": kind, "preset": config, "meta": {...}}
    configs/inference.json  the source bundle's inference config; the network is rebuilt
                            from metadata "sam3d" and loads models/model.pt
    configs/train.json      the run's executed config (else the source bundle's train.json)
    configs/evaluate.json   the source bundle's evaluate.json, loading models/model.pt
    configs/logging.conf    (and multi_gpu_train.json where the source bundle has one)
    models/model.pt         the weights as a plain state dict of ``network_def``
    models/model.ts         TorchScript of the image-only view (traced; see sam3d.models.export)
    docs/README.md          the zoo template's sections, filled from the run
    docs/data_license.txt, LICENSE

The metadata "sam3d" entry is the one place the exported configs read the model's shape
and the run's preprocessing (dataset preset) from (``@_meta_#sam3d#...``): MONAI reads
``configs/metadata.json`` beside the config file by default.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)

NETWORK_META = "@_meta_#sam3d"
LOAD = "$sam3d.apps.export.load_weights(@network_def, {path}).to(@device)"


@dataclass(frozen=True)
class BundleExport:
    """How one model kind's source bundle becomes a zoo bundle.

    ``kind``: the registered model kind; its :class:`~sam3d.models.registry.ModelKind`
    says the source bundle (``bundle``) and whether ``network_def`` is the image-only view
    (``promptable``: :class:`sam3d.engine.CentreClickNetwork`, as the zoo's checks call
    ``net(image)``). ``inference`` / ``evaluate``: keys set in the source bundle's config
    of that name (``None`` deletes a key); ``network_def`` is always rebuilt from the
    metadata.
    """

    kind: str
    inference: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    preprocessing: str = ""  # one paragraph for the README

    @property
    def bundle(self) -> str:
        from sam3d.models.registry import get_kind

        bundle = get_kind(self.kind).bundle
        if bundle is None:
            raise Sam3DError(f"{self.kind} models train in no bundle: nothing to export")
        return bundle

    @property
    def promptable(self) -> bool:
        from sam3d.models.registry import get_kind

        return get_kind(self.kind).prompt_required


EXPORTS: dict[str, BundleExport] = {
    "sam3d": BundleExport(
        "sam3d",
        inference={
            "loaded": None,
            "network": LOAD.format(path="@checkpoint") + ".eval()",
            "dataset_info": f"$sam3d.inference.resolve_dataset({NETWORK_META}#meta#dataset)",
        },
        evaluate={
            "trained": None,
            "network": LOAD.format(path="@ckpt_path"),
            "dataset_info": (
                f"$sam3d.data.pipelines.load_dataset_preset({NETWORK_META}#meta#dataset)"
            ),
        },
        preprocessing=(
            "Volumes are reoriented to RAS and resampled to the dataset preset's spacing "
            "({spacing} mm, bilinear); intensities are clipped to the HU window {window} and "
            "z-scored with the preset's global mean {mean} and SD {std} (the training run's "
            "`sam3d.data.pipelines` builders). Clicks in original voxels (or RAS mm) are "
            "mapped onto that grid; the network sees {crop}^3 crops around them, grown while "
            "the lesion touches a border, and the probabilities are inverted back to the "
            "input's grid."
        ),
    ),
    "topolora": BundleExport(
        "topolora",
        inference={
            "checkpoint": None,
            "network": LOAD.format(path="@ckpt_path"),
        },
        evaluate={"initialize": "EVAL_INIT"},
        preprocessing=(
            "Images are read with PIL at native size, grey images repeated to RGB, pixel "
            "values kept in 0..255; the network resizes the longest side to SAM's "
            "{image_size} input, normalises with SAM's pixel mean/SD, and returns logits at "
            "the image's native size, where every metric is computed."
        ),
    ),
}


def load_weights(network: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Load ``models/model.pt`` into ``network`` (strict); returns ``network``.

    Takes the zoo's plain state dict or a sam3d trained checkpoint (its ``state_dict``).
    """
    from sam3d.models.checkpoint import read_checkpoint

    obj = read_checkpoint(path, "bundle weights")
    if isinstance(obj, dict) and "state_dict" in obj and "preset" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise Sam3DError(f"{path} is not a state dict")
    try:
        network.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise Sam3DError(
            f"{path} does not fit this network ({str(e).strip().splitlines()[0][:200]})"
        ) from e
    return network


def _json_safe(value: Any) -> Any:
    """Plain JSON data: tensors and numpy scalars to numbers / lists, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Sam3DError(f"cannot read {path}: {e}") from e


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4) + "\n")


def _with(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``config`` with keys set (in place, order kept; new keys appended) or deleted."""
    out = dict(config)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _network_def(promptable: bool) -> dict[str, Any]:
    net = {
        "_target_": "sam3d.models.registry.build_model",
        "kind": f"{NETWORK_META}#model",
        "config": f"{NETWORK_META}#preset",
    }
    return {"_target_": "sam3d.engine.CentreClickNetwork", "network": net} if promptable else net


def _imports(config: dict[str, Any]) -> list[str]:
    imports = list(config.get("imports", []))
    for name in ("$import sam3d.apps.export", "$import sam3d.models.registry"):
        if name not in imports:
            imports.append(name)
    return imports


def run_metrics(run_dir: Path, meta: dict[str, Any]) -> dict[str, float]:
    """The validation metrics the run logged for the epoch of its best checkpoint.

    The checkpoint's key metric, plus every ``val_*`` metric of that epoch in the run's
    MLflow store (``eval/mlruns.db``, run id from ``models/last.pt``) when it has one.
    """
    metrics = {
        k: float(v) for k, v in meta.items() if k.startswith("val_") and isinstance(v, int | float)
    }
    db, last = run_dir / "eval" / "mlruns.db", run_dir / "models" / "last.pt"
    epoch = meta.get("epoch")
    if not (db.is_file() and last.is_file() and epoch is not None):
        return metrics
    from sam3d.models.checkpoint import read_checkpoint

    run_id = read_checkpoint(last, "resume checkpoint").get("mlflow_run_id")
    if not run_id:
        return metrics
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        for key in client.get_run(run_id).data.metrics:
            if key.startswith("val_"):
                for m in client.get_metric_history(run_id, key):
                    if m.step == int(epoch):
                        metrics[key] = float(m.value)
    except Exception as e:  # a foreign or damaged store: the checkpoint's metric still counts
        logger.warning("could not read the run's MLflow metrics from %s: %s", db, e)
    return metrics


def export_bundle(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    version: str | None = None,
    torchscript: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the model-zoo bundle of the training run ``run_dir`` to ``out``; returns ``out``.

    ``version`` (default: the source bundle's) goes to ``metadata.json`` with a changelog
    line. ``torchscript`` also writes ``models/model.ts`` (traced image-only view).
    """
    from sam3d.models.checkpoint import read_trained
    from sam3d.presets import BUNDLE_DIR

    run_dir, out = Path(run_dir), Path(out)
    ckpt_path = run_dir / "models" / "model.pt"
    if not ckpt_path.is_file():
        raise Sam3DError(f"{run_dir} is not a training run: no models/model.pt")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise Sam3DError(f"{out} exists and is not empty (pass overwrite to replace it)")
    ckpt = read_trained(ckpt_path)
    kind = ckpt["model"]
    if kind not in EXPORTS:
        raise Sam3DError(f"no bundle export for {kind} models (known: {', '.join(EXPORTS)})")
    spec = EXPORTS[kind]
    src = BUNDLE_DIR / spec.bundle
    if not (src / "metadata.json").is_file():
        raise Sam3DError(f"source bundle {src} not found: export runs from a source checkout")
    meta = {k: v for k, v in ckpt.items() if k not in ("preset", "state_dict", "meta", "model")}
    meta.update(ckpt.get("meta") or {})
    meta = _json_safe(meta)
    preset = _json_safe(ckpt["preset"])
    if isinstance(preset, dict) and preset.get("sam_checkpoint"):
        preset["sam_checkpoint"] = None  # the trained weights replace SAM's
    executed_path = run_dir / "eval" / "config_executed.json"
    executed = _read_json(executed_path) if executed_path.is_file() else None

    if out.exists():
        shutil.rmtree(out)
    (out / "configs").mkdir(parents=True)
    # weights: a plain state dict of network_def (the zoo's models/model.pt)
    (out / "models").mkdir()
    torch.save(ckpt["state_dict"], out / "models" / "model.pt")

    metadata = _metadata(src, kind, preset, meta, run_metrics(run_dir, meta), version)
    _write_json(out / "configs" / "metadata.json", metadata)
    _write_json(out / "configs" / "inference.json", _inference(src, spec))
    train = dict(executed) if executed is not None else _read_json(src / "train.json")
    train.pop("_meta_", None)
    train["bundle_root"] = "."
    train["imports"] = _imports(train)
    _write_json(out / "configs" / "train.json", train)
    if (src / "evaluate.json").is_file():
        _write_json(out / "configs" / "evaluate.json", _evaluate(src, spec))
    for name in ("multi_gpu_train.json", "logging.conf"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / "configs" / name)
    shutil.copy2(src / "LICENSE", out / "LICENSE")
    (out / "docs").mkdir()
    shutil.copy2(src / "docs" / "data_license.txt", out / "docs" / "data_license.txt")

    formats = {"models/model.pt": "plain state dict of `network_def`"}
    if torchscript:
        formats["models/model.ts"] = _write_torchscript(out, kind, ckpt)
    readme = bundle_readme(spec, metadata, train if executed is not None else None, formats)
    (out / "docs" / "README.md").write_text(readme)
    return out


def _metadata(
    src: Path,
    kind: str,
    preset: Any,
    meta: dict[str, Any],
    metrics: dict[str, float],
    version: str | None,
) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    metadata = _read_json(src / "metadata.json")
    if version is not None and version != metadata["version"]:
        metadata["version"] = version
        metadata["changelog"] = {
            version: "exported from a sam3d training run",
            **metadata["changelog"],
        }
    evals = dict(metadata.get("eval_metrics") or {})
    evals.update({k: round(v, 6) for k, v in metrics.items()})
    metadata["eval_metrics"] = evals
    if isinstance(preset, dict) and "crop_size" in preset:  # the trained crop, not vit_b's
        c = int(preset["crop_size"])
        fmt = metadata["network_data_format"]
        fmt["inputs"]["image"]["spatial_shape"] = [c, c, c]
        fmt["outputs"]["pred"]["spatial_shape"] = [c, c, c]
    try:
        sam3d_version = installed("sam3d-med")
    except PackageNotFoundError:
        sam3d_version = "0.1.0"
    metadata["sam3d"] = {
        "model": kind,
        "preset": preset,
        "meta": meta,
        "package": {
            "name": "sam3d-med",
            "version": sam3d_version,
            "install": "not on PyPI: pip install -e <sam3d source checkout>",
        },
    }
    return metadata


def _inference(src: Path, spec: BundleExport) -> dict[str, Any]:
    config = _read_json(src / "inference.json")
    changes = {"imports": _imports(config), "bundle_root": ".", **spec.inference}
    changes["network_def"] = _network_def(spec.promptable)
    return _with(config, changes)


def _evaluate(src: Path, spec: BundleExport) -> dict[str, Any]:
    config = _read_json(src / "evaluate.json")
    changes = dict(spec.evaluate)
    if changes.get("initialize") == "EVAL_INIT":  # weights loaded by an initialize step
        changes["initialize"] = [
            "$sam3d.apps.export.load_weights(@network_def, @ckpt_path)"
            if "load_trained_weights" in step
            else step
            for step in config.get("initialize", [])
        ]
    changes["network_def"] = _network_def(spec.promptable)
    if "imports" in config:  # else the imports of train.json, which it is merged onto
        changes["imports"] = _imports(config)
    return _with(config, changes)


def _write_torchscript(out: Path, kind: str, ckpt: dict[str, Any]) -> str:
    from sam3d.models.export import example_input, inference_view, to_torchscript
    from sam3d.models.registry import build_model

    model = build_model(kind, ckpt["preset"])
    model.load_state_dict(ckpt["state_dict"])
    view = inference_view(model, kind)
    _, how = to_torchscript(view, example_input(view), out / "models" / "model.ts")
    shape = "x".join(str(s) for s in example_input(view).shape)
    return f"TorchScript ({how}d at {shape}) of the image-only view"


def bundle_readme(
    spec: BundleExport,
    metadata: dict[str, Any],
    train: dict[str, Any] | None,
    formats: dict[str, str],
) -> str:
    """``docs/README.md`` in the zoo template's sections, filled from the run."""
    s3 = metadata["sam3d"]
    preset, meta = s3["preset"], s3["meta"]
    name = preset.get("name", "?") if isinstance(preset, dict) else str(preset)
    lines = [f"# {metadata['name']}", ""]
    lines += ["### **Authors**", "", metadata["authors"], ""]
    lines += ["### **Tags**", "", f"Segmentation, SAM, {metadata['task']}", ""]
    lines += ["## **Model Description**", "", metadata["description"], ""]
    lines += [f'Model: `{s3["model"]}`, preset `{name}` (`configs/metadata.json` "sam3d").', ""]
    lines += ["## **Data**", "", f"Sources: {metadata['data_source']}.", ""]
    if train is not None:
        keys = ("dataset_dir", "dataset_preset", "phantom_cases", "val_fraction", "test_fraction")
        got = [f"`{k}` = `{train[k]}`" for k in keys if k in train]
        if got:
            lines += ["This run: " + ", ".join(got) + ".", ""]
    lines += ["Licences of the datasets: `docs/data_license.txt`.", ""]
    dataset = meta.get("dataset") or {}
    fill = {
        "spacing": dataset.get("spacing_mm"),
        "window": dataset.get("window_hu"),
        "mean": dataset.get("mean"),
        "std": dataset.get("std"),
        "crop": preset.get("crop_size") if isinstance(preset, dict) else None,
        "image_size": preset.get("image_size") if isinstance(preset, dict) else None,
    }
    lines += ["#### **Preprocessing**", "", spec.preprocessing.format(**fill), ""]
    lines += ["#### **Training configuration**", ""]
    if train is not None:
        keys = (
            "preset", "max_epochs", "batch_size", "accumulation_steps", "learning_rate",
            "weight_decay", "grad_clip_norm", "n_pos_clicks", "n_neg_clicks", "lambda_cldice",
            "seed",
        )  # fmt: skip
        lines += ["| setting | value |", "| --- | --- |"]
        lines += [f"| `{k}` | `{train[k]}` |" for k in keys if k in train]
        lines += ["", "The full recipe as run: `configs/train.json`.", ""]
    else:
        lines += [
            "The run saved no executed config; `configs/train.json` is the source recipe.",
            "",
        ]
    lines += ["## **Performance**", ""]
    measured = {k: v for k, v in metadata["eval_metrics"].items() if v is not None}
    if measured:
        epoch = meta.get("epoch")
        at = f" at epoch {epoch} (the best checkpoint)" if epoch is not None else ""
        lines += [f"Validation metrics the run logged{at}:", ""]
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4f} |" for k, v in measured.items()]
    else:
        lines += ["The run logged no validation metric."]
    lines += [
        "",
        "Test-split scores: `python -m monai.bundle run --config_file "
        "\"['configs/train.json','configs/evaluate.json']\"`.",
        "",
        "#### **Exported formats**",
        "",
        "| file | what |",
        "| --- | --- |",
    ]
    lines += [f"| `{k}` | {v} |" for k, v in formats.items()]
    lines += [
        "",
        "## **Additional Usage Steps**",
        "",
        "sam3d-med is not on PyPI: install it from a source checkout, then the pins of "
        "`configs/metadata.json`:",
        "",
        "```",
        "pip install -e /path/to/sam3d        # the checkout this bundle was exported from",
        "python -m monai.bundle run --config_file configs/inference.json \\",
        "    --input_dict \"{'image': 'ct.nii.gz', 'points': [[60, 52, 31]], 'point_labels': [1]}\""
        if spec.promptable
        else "python -m monai.bundle run --config_file configs/inference.json --input_dir images/",
        "```",
        "",
        "Offline zoo checks: `sam3d bundle check .`.",
        "",
        "## **System Configuration**",
        "",
        f"MONAI {metadata['monai_version']}, PyTorch {metadata['pytorch_version']}. "
        "Training and inference run on one CUDA GPU (bf16 autocast) or, slowly, on the CPU.",
        "",
        "## **Limitations**",
        "",
        f"{metadata.get('intended_use', 'Research only')}. Not cleared for any clinical use.",
        "",
        "## **References**",
        "",
    ]
    lines += [f"- {r}" for r in metadata.get("references", [])]
    lines += [
        "",
        "## **License**",
        "",
        "Code and weights: `LICENSE`; data: `docs/data_license.txt`.",
        "",
    ]
    return "\n".join(lines)
