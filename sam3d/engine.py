"""Glue between the kits bundle's configs and MONAI / ignite / MLflow.

MONAI's engines do the training and the evaluation; this module adds only what they
lack for a promptable model and a resumable, tracked run:

- datasets: :func:`ensure_dataset` (generate phantoms when ``dataset_dir`` holds no
  dataset), :func:`load_datalist` (MSD ``dataset.json`` or KiTS21 case folders, with
  deterministic train/validation/test splits);
- clicks through engines: :func:`click_prepare_batch` (MONAI's
  ``PrepareBatchExtraInput``) and :class:`ClickCropInferer` (the reference's single
  crop centred on the clicks, pasted back into the whole volume);
- :class:`GradientClipping` (between backward and optimizer step, AMP-aware);
- :class:`TrainingCheckpoint`: best ``model.pt`` (the format ``load_sam3d_checkpoint``
  reads) and resumable ``last.pt``, both written atomically, restored at start;
- :class:`MLflowRun` / :class:`MLflowRunHandler`: one MLflow run for a whole training
  (trainer and evaluator), checked for reachability before training, reopened on resume;
- :class:`CaseMetricsCSV`: the per-case CSV of ``evaluate.json``;
- :class:`CentreClickNetwork`: an image-only view of a promptable network for
  ``monai.bundle verify_net_in_out``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from monai.engines import PrepareBatchExtraInput
from monai.engines.utils import IterationEvents
from monai.handlers import MLFlowHandler
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, path_to_sqlite_uri, path_to_uri

from sam3d.data.io import atomic_write
from sam3d.errors import Sam3DError

logger = logging.getLogger("sam3d.engine")

__all__ = [
    "is_rank0",
    "find_dataset",
    "ensure_dataset",
    "checked",
    "load_datalist",
    "click_prepare_batch",
    "window_start",
    "ClickCropInferer",
    "CentreClickNetwork",
    "GradientClipping",
    "read_resume_state",
    "TrainingCheckpoint",
    "MLflowRun",
    "MLflowRunHandler",
    "CaseMetricsCSV",
    "save_executed_config",
    "atomic_torch_save",
]


def is_rank0() -> bool:
    """True outside distributed runs and on rank 0 of a distributed run."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, newline=""))


# --------------------------------------------------------------------------- datasets

_KITS21_LABELS = ("aggregated_MAJ_seg.nii.gz", "segmentation.nii.gz")


def find_dataset(dataset_dir: str | Path) -> str | None:
    """``"msd"`` (a ``dataset.json``), ``"kits21"`` (``case_*/imaging.nii.gz``) or None."""
    root = Path(dataset_dir)
    if (root / "dataset.json").is_file():
        return "msd"
    if any(root.glob("case_*/imaging.nii.gz")):
        return "kits21"
    return None


def ensure_dataset(
    dataset_dir: str | Path,
    n_cases: int = 12,
    seed: int = 0,
    phantom_kwargs: dict[str, Any] | None = None,
) -> str:
    """Return the dataset kind of ``dataset_dir``; generate CT phantoms there if it holds none.

    Generation is deterministic (``seed``) and happens only when the folder is missing or
    empty; a non-empty folder without a recognisable dataset is an error. ``phantom_kwargs``
    go to ``make_ct_phantom`` (e.g. ``shape_vox``, ``spacing_mm``, ``n_lesions``). In a
    distributed run rank 0 generates while the others wait.
    """
    root = Path(dataset_dir)
    kind = find_dataset(root)
    if kind is not None:
        logger.info(f"dataset: {kind} dataset in {root}")
        return kind
    if root.exists() and any(root.iterdir()):
        raise Sam3DError(
            f"{root} holds neither an MSD-style dataset.json nor KiTS21 case_*/imaging.nii.gz "
            "folders; point --dataset_dir at a dataset (or at an empty folder for phantoms)."
        )
    if is_rank0():
        from sam3d.data.phantoms import write_phantom_dataset

        kwargs = {
            k: tuple(v) if isinstance(v, list) else v for k, v in (phantom_kwargs or {}).items()
        }
        logger.warning(
            f"dataset: no dataset in {root}: generating {n_cases} synthetic CT phantoms there "
            f"(seed {seed}, {kwargs or 'default size'}); pass --dataset_dir for real data."
        )
        write_phantom_dataset("ct", root, n=int(n_cases), seed=int(seed), **kwargs)
    _barrier()
    return "msd"


def checked(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a :class:`Sam3DError` ends the program with its message and exit code 2.

    Bundle configs wrap their start-up checks in this so that a user error (unreachable
    tracking server, no dataset) prints one line instead of MONAI's nested traceback.
    """
    try:
        return fn(*args, **kwargs)
    except Sam3DError as e:
        logger.error(f"error: {e}")
        print(f"sam3d bundle: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None


def _labelled(entries: Any, root: Path) -> list[dict[str, str]]:
    out = []
    for e in entries or []:
        if isinstance(e, dict) and "image" in e and "label" in e:
            out.append(
                {
                    "image": os.path.normpath(str(root / e["image"])),
                    "label": os.path.normpath(str(root / e["label"])),
                }
            )
    return out


def _carve(
    cases: list[dict[str, str]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict[str, str]]]:
    cases = sorted(cases, key=lambda c: c["image"])
    random.Random(seed).shuffle(cases)
    n = len(cases)
    n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if n - n_test >= 2 and val_fraction > 0 else 0
    return {
        "test": cases[:n_test],
        "validation": cases[n_test : n_test + n_val],
        "training": cases[n_test + n_val :],
    }


def load_datalist(
    dataset_dir: str | Path,
    split: str = "training",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Labelled cases ``[{"image": path, "label": path}, ...]`` of one split.

    MSD ``dataset.json``: its labelled ``validation`` / ``test`` lists when it has them
    (phantom datasets do), otherwise those splits are carved from ``training``
    deterministically (``seed``); KiTS21 case folders are carved the same way.
    """
    if split not in ("training", "validation", "test"):
        raise Sam3DError(f"unknown split {split!r}: use training, validation or test.")
    root = Path(dataset_dir)
    kind = find_dataset(root)
    if kind == "msd":
        spec = json.loads((root / "dataset.json").read_text())
        given = {k: _labelled(spec.get(k), root) for k in ("training", "validation", "test")}
        if given["validation"] and given["test"]:
            splits = given
        else:
            splits = _carve(
                given["training"],
                0.0 if given["validation"] else val_fraction,
                0.0 if given["test"] else test_fraction,
                seed,
            )
            for k in ("validation", "test"):
                if given[k]:
                    splits[k] = given[k]
    elif kind == "kits21":
        cases = []
        for case in sorted(root.glob("case_*")):
            label = next((case / n for n in _KITS21_LABELS if (case / n).is_file()), None)
            if (case / "imaging.nii.gz").is_file() and label is not None:
                cases.append({"image": str(case / "imaging.nii.gz"), "label": str(label)})
        splits = _carve(cases, val_fraction, test_fraction, seed)
    else:
        raise Sam3DError(f"no dataset in {root}: expected a dataset.json or KiTS21 case folders.")
    data = splits[split]
    if not data:
        raise Sam3DError(f"the {split} split of {root} is empty; add labelled cases.")
    missing = [p for d in data for p in d.values() if not os.path.isfile(p)]
    if missing:
        raise Sam3DError(
            f"{len(missing)} file(s) of the {split} split are missing, e.g. {missing[0]}."
        )
    return data


# --------------------------------------------------------------------- clicks in engines


def click_prepare_batch() -> PrepareBatchExtraInput:
    """Hand ``points`` / ``point_labels`` of a batch to the inferer and network as kwargs."""
    return PrepareBatchExtraInput(extra_keys={"points": "points", "point_labels": "point_labels"})


def window_start(centre: float, roi: int, size: int) -> int:
    """Start of a ``roi``-voxel window centred on ``centre``, shifted inside ``size`` voxels."""
    return int(min(max(round(centre) - roi // 2, 0), max(size - roi, 0)))


class ClickCropInferer(Inferer):
    """The reference's single-click protocol: one window centred on the clicks.

    For each volume the network sees one ``roi_size`` crop centred on the mean of its
    positive clicks (the first valid click if none is positive), shifted inward at the
    borders and padded with the volume's minimum where the volume is smaller. The crop's
    logits are pasted into a whole-volume map that is background everywhere else, so
    Dice and NSD are computed on the whole volume (lesions beyond the crop count as missed).

    Args:
        roi_size: crop edge in voxels (an int or three ints).
        background_logit: the logit of the non-background classes outside the crop
            (class 0 gets 0 there).

    Call: ``inputs`` ``B x 1 x H x W x D``, ``points`` ``B x N x 3`` voxel indices of
    ``inputs``, ``point_labels`` ``B x N`` -> logits ``B x K x H x W x D``.
    """

    def __init__(self, roi_size: int | Sequence[int], background_logit: float = -20.0) -> None:
        super().__init__()
        sizes = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
        self.roi_size = [int(r) for r in sizes]
        self.background_logit = float(background_logit)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        spatial = list(x.shape[2:])
        out: torch.Tensor | None = None
        for b in range(x.shape[0]):
            pts = points[b].to(torch.float32)
            lab = point_labels[b]
            chosen = pts[lab == 1] if bool((lab == 1).any()) else pts[lab >= 0][:1]
            centre = chosen.mean(0).tolist() if chosen.numel() else [s / 2 for s in spatial]
            starts = [window_start(c, r, s) for c, r, s in zip(centre, self.roi_size, spatial)]
            pad = [max(r - s, 0) for r, s in zip(self.roi_size, spatial)]
            vol = x[b : b + 1]
            if any(pad):
                flat = [v for p in reversed(pad) for v in (0, p)]
                vol = torch.nn.functional.pad(vol, flat, value=float(vol.min()))
            crop = vol[
                ...,
                starts[0] : starts[0] + self.roi_size[0],
                starts[1] : starts[1] + self.roi_size[1],
                starts[2] : starts[2] + self.roi_size[2],
            ]
            shift = torch.tensor(starts, dtype=torch.float32, device=pts.device)
            logits = network(
                crop, *args, points=(pts - shift)[None], point_labels=lab[None], **kwargs
            )
            if out is None:
                out = torch.full(
                    (x.shape[0], logits.shape[1], *spatial), self.background_logit,
                    dtype=logits.dtype, device=logits.device,
                )  # fmt: skip
                out[:, 0] = 0
            keep = [min(r, s - st) for r, s, st in zip(self.roi_size, spatial, starts)]
            out[
                b,
                :,
                starts[0] : starts[0] + keep[0],
                starts[1] : starts[1] + keep[1],
                starts[2] : starts[2] + keep[2],
            ] = logits[0, :, : keep[0], : keep[1], : keep[2]]
        assert out is not None
        return convert_to_dst_type(out, inputs)[0] if hasattr(inputs, "meta") else out


class CentreClickNetwork(torch.nn.Module):
    """An image-only view of a promptable network: one positive click at the crop centre.

    For tools that call ``network(image)`` only (``monai.bundle verify_net_in_out``).
    ``image`` ``B x C x H x W x D`` -> the wrapped network's logits.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        centre = torch.tensor([(s - 1) / 2 for s in image.shape[2:]], device=image.device)
        points = centre.expand(b, 1, 3).contiguous()
        labels = torch.ones(b, 1, dtype=torch.long, device=image.device)
        return self.network(image, points=points, point_labels=labels)


class GradientClipping:
    """Clip the gradient norm after ``backward`` and before ``optimizer.step`` (AMP-aware)."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = float(max_norm)

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        groups = engine.optimizer.param_groups
        params = [p for g in groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)


# ------------------------------------------------------------------- checkpoints/resume


def read_resume_state(path: str | Path, max_epochs: int | None = None) -> dict[str, Any] | None:
    """The state in ``last.pt`` if a training can resume from it, else None.

    A training that already reached its ``max_epochs`` (or ``max_epochs``, if given) is
    finished: a new run starts instead. A corrupt file is an error, not a silent restart.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many kinds for corrupt files
        raise Sam3DError(
            f"cannot read the resume checkpoint {path} ({e}); delete it to start anew."
        ) from e
    limit = int(max_epochs if max_epochs is not None else state.get("max_epochs", 0))
    if int(state.get("epoch", 0)) >= limit:
        return None
    return state


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


class TrainingCheckpoint:
    """Best and last checkpoints of a training, and resume from the last one.

    - ``<ckpt_dir>/model.pt``: ``{"preset", "state_dict", "dataset", "meta"}`` of the epoch
      with the best ``key_metric`` (what ``sam3d.models.load_sam3d_checkpoint`` reads);
    - ``<ckpt_dir>/last.pt``: network, optimizer, scheduler, epoch, iteration, best metric
      and the MLflow run id, after every epoch.

    Both are written atomically by rank 0 only. At the trainer's start, a resumable
    ``last.pt`` (see :func:`read_resume_state`) restores all of it on every rank.
    Attach after the validation and LR-scheduler handlers (the configs' handler order).
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None = None,
        evaluator: Any | None = None,
        key_metric: str = "val_mean_dice",
        preset: str | dict | None = None,
        meta: dict | None = None,
        mlflow_run: MLflowRun | None = None,
        resume: bool = True,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.evaluator, self.key_metric = evaluator, key_metric
        self.preset, self.meta = preset, dict(meta or {})
        self.mlflow_run, self.resume = mlflow_run, resume
        self.best_metric, self.best_epoch = -math.inf, 0
        self._validated: tuple[int, float] | None = None

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "model.pt"

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    def attach(self, trainer: Any) -> None:
        from ignite.engine import Events

        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self.load)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._on_validated)

    def _on_validated(self, evaluator: Any) -> None:
        value = evaluator.state.metrics.get(self.key_metric)
        if value is not None:
            self._validated = (int(self._trainer.state.epoch), float(value))

    def load(self, trainer: Any) -> None:
        state = read_resume_state(self.last_path, trainer.state.max_epochs) if self.resume else None
        if state is None:
            return
        _unwrap(self.network).load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        trainer.state.epoch = int(state["epoch"])
        trainer.state.iteration = int(state["iteration"])
        self.best_metric = float(state.get("best_metric", -math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))
        logger.warning(
            f"resume: continuing from {self.last_path} after epoch {trainer.state.epoch} "
            f"(iteration {trainer.state.iteration}, best {self.key_metric} "
            f"{self.best_metric:.4f} at epoch {self.best_epoch})"
        )

    def save(self, trainer: Any) -> None:
        if not is_rank0():
            return
        epoch = int(trainer.state.epoch)
        sd = {k: v.detach().cpu() for k, v in _unwrap(self.network).state_dict().items()}
        if self._validated is not None and self._validated[0] == epoch:
            value = self._validated[1]
            if not math.isnan(value) and value > self.best_metric:
                self.best_metric, self.best_epoch = value, epoch
                meta = {**self.meta, "epoch": epoch, self.key_metric: value}
                net = _unwrap(self.network)
                if hasattr(net, "preset"):  # a Sam3D: the format load_sam3d_checkpoint reads
                    from sam3d.models import save_sam3d_checkpoint

                    save_sam3d_checkpoint(
                        net, self.best_path, meta=meta, dataset=meta.get("dataset")
                    )
                else:
                    atomic_torch_save(
                        {"preset": self.preset, "state_dict": sd, "dataset": meta.get("dataset"),
                         "meta": meta},
                        self.best_path,
                    )  # fmt: skip
                logger.info(
                    f"checkpoint: new best {self.key_metric} {value:.4f} -> {self.best_path}"
                )
        atomic_torch_save(
            {
                "network": sd,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": (
                    None if self.lr_scheduler is None else self.lr_scheduler.state_dict()
                ),
                "epoch": epoch,
                "iteration": int(trainer.state.iteration),
                "max_epochs": int(trainer.state.max_epochs),
                "best_metric": float(self.best_metric),
                "best_epoch": int(self.best_epoch),
                "mlflow_run_id": None if self.mlflow_run is None else self.mlflow_run.active_run_id,
                "preset": self.preset,
                "meta": self.meta,
            },
            self.last_path,
        )


# ------------------------------------------------------------------------------ MLflow


class MLflowRun:
    """The one MLflow run of a training, shared by the trainer's and evaluator's handlers.

    Args:
        tracking_uri: an ``http(s)://`` server, a ``sqlite:///`` file, or None/"" for a
            SQLite store at ``default_store``. ``MLFLOW_TRACKING_URI`` in the environment wins
            (as in MONAI's ``MLFlowHandler``).
        experiment_name / run_name: where the run goes and what it is called.
        resume_file: the training's ``last.pt``; if resumable, its run id is reopened.
        max_epochs: the training's length (decides whether ``last.pt`` is resumable).
        enabled: False turns tracking off (also off on ranks > 0).

    :meth:`check` (run it before building datasets) fails at once, with one sentence, when
    a server cannot be reached; :attr:`run_id` creates or reopens the run on first use.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "sam3d",
        run_name: str | None = None,
        resume_file: str | Path | None = None,
        max_epochs: int | None = None,
        enabled: bool = True,
        default_store: str | Path = "eval/mlruns.db",
        timeout_s: float = 5.0,
    ) -> None:
        self.enabled = bool(enabled) and is_rank0()
        env = os.environ.get("MLFLOW_TRACKING_URI")
        uri = env or tracking_uri or path_to_sqlite_uri(os.path.abspath(str(default_store)))
        if uri.startswith("file:") or "://" not in uri:
            raise Sam3DError(
                f"tracking_uri {uri!r} is not usable: pass http://HOST:PORT of an MLflow server "
                "or sqlite:///PATH/mlruns.db (MLflow no longer supports plain folders)."
            )
        self.tracking_uri = uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.resume_file = resume_file
        self.max_epochs = max_epochs
        self.timeout_s = float(timeout_s)
        self._run_id: str | None = None
        self._client: Any = None

    @property
    def artifact_location(self) -> str | None:
        if self.tracking_uri.startswith("sqlite:///"):
            return path_to_uri(Path(self.tracking_uri[len("sqlite:///") :]).parent / "mlruns")
        return None

    def check(self) -> MLflowRun:
        """Fail now, with a clear message, if the tracking store cannot be reached."""
        if not self.enabled:
            return self
        if self.tracking_uri.startswith(("http://", "https://")):
            url = self.tracking_uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
                    ok = r.status == 200
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise Sam3DError(
                    f"the MLflow tracking server at {self.tracking_uri} cannot be reached "
                    f"({reason}); start it, fix --tracking_uri, or drop it to log into the "
                    "local SQLite store."
                ) from None
            if not ok:
                raise Sam3DError(
                    f"the MLflow tracking server at {self.tracking_uri} is not healthy."
                )
        elif self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///") :])
            db.parent.mkdir(parents=True, exist_ok=True)
        logger.info(f"mlflow: tracking into {self.tracking_uri} ({self.experiment_name!r})")
        return self

    @property
    def client(self) -> Any:
        if self._client is None:
            import mlflow

            env = os.environ.get("MLFLOW_TRACKING_URI")
            self._client = mlflow.MlflowClient(tracking_uri=None if env else self.tracking_uri)
        return self._client

    @property
    def active_run_id(self) -> str | None:
        """The run id if the run was started (None when tracking is off or not started yet)."""
        return self._run_id

    @property
    def run_id(self) -> str:
        """Create the run, or reopen the one recorded in a resumable ``last.pt``."""
        if self._run_id is not None:
            return self._run_id
        if not self.enabled:
            raise RuntimeError("MLflow tracking is disabled on this process")
        from mlflow.exceptions import MlflowException

        state = read_resume_state(self.resume_file, self.max_epochs) if self.resume_file else None
        previous = state.get("mlflow_run_id") if state else None
        if previous:
            try:
                run = self.client.get_run(previous)
                self.client.update_run(previous, status="RUNNING")
                self._run_id = run.info.run_id
                logger.warning(f"mlflow: resuming run {self._run_id}")
                return self._run_id
            except MlflowException:
                logger.warning(f"mlflow: run {previous} of {self.resume_file} not found; new run")
        exp = self.client.get_experiment_by_name(self.experiment_name)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location
            )
        )
        run = self.client.create_run(exp_id, run_name=self.run_name)
        self._run_id = run.info.run_id
        logger.info(f"mlflow: run {self._run_id} ({run.info.run_name})")
        return self._run_id


class MLflowRunHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` logging into the shared :class:`MLflowRun` (not a new one)."""

    def __init__(self, run: MLflowRun, **kwargs: Any) -> None:
        self.run = run
        if not run.enabled:  # ranks > 0 or tracking off: no client, no store access
            return
        if "MLFLOW_TRACKING_URI" in os.environ:
            kwargs["tracking_uri"] = None
        else:
            kwargs["tracking_uri"] = run.tracking_uri
        kwargs.setdefault("experiment_name", run.experiment_name)
        kwargs.setdefault("artifact_location", run.artifact_location)
        super().__init__(**kwargs)

    def attach(self, engine: Any) -> None:
        if self.run.enabled:
            super().attach(engine)

    def start(self, engine: Any) -> None:
        if self.cur_run is None:
            self.cur_run = self.client.get_run(self.run.run_id)
        super().start(engine)


# ------------------------------------------------------------------------ evaluation


class CaseMetricsCSV:
    """Write one CSV row per case (``case`` and each metric) when an evaluator completes.

    Reads the per-case values that MONAI metric handlers keep with ``save_details=True``
    (``engine.state.metric_details``) and the case names from the image metadata.
    """

    def __init__(
        self, path: str | Path, metric_names: Sequence[str], image_key: str = "image"
    ) -> None:
        self.path = Path(path)
        self.metric_names = list(metric_names)
        self.image_key = image_key
        self._cases: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self._cases.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            img = item[self.image_key]
            names = img.meta.get("filename_or_obj", "?") if hasattr(img, "meta") else "?"
            names = names if isinstance(names, (list, tuple)) else [names]
            self._cases.extend(str(n).replace("\\", "/").rsplit("/", 1)[-1] for n in names)

    def write(self, engine: Any) -> None:
        if not is_rank0():
            return
        details = getattr(engine.state, "metric_details", {}) or {}
        columns = {}
        for name in self.metric_names:
            values = details.get(name)
            if values is None:
                raise RuntimeError(f"no per-case values for {name!r}: set save_details=True")
            t = torch.as_tensor(values, dtype=torch.float64).reshape(len(self._cases), -1)
            columns[name] = t.nanmean(1).tolist()
        rows = [["case", *self.metric_names]]
        for i, case in enumerate(self._cases):
            rows.append([case, *(f"{columns[n][i]:.6f}" for n in self.metric_names)])
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        _atomic_write_text(self.path, buf.getvalue())
        logger.info(f"evaluation: per-case metrics of {len(self._cases)} cases -> {self.path}")


def save_executed_config(path: str | Path) -> str:
    """Write the config being executed (files merged, command-line overrides applied).

    MONAI gives config expressions no handle on their parser, so this finds the
    ``ConfigParser`` that is evaluating the expression on the call stack. Returns the path.
    """
    from monai.bundle import ConfigParser

    frame = sys._getframe(1)
    while frame is not None:
        parser = frame.f_locals.get("self")
        if isinstance(parser, ConfigParser):
            path = Path(path)
            if is_rank0():
                _atomic_write_text(path, json.dumps(parser.get(), indent=2, default=str) + "\n")
            return str(path)
        frame = frame.f_back
    raise RuntimeError("save_executed_config must be called from a bundle config expression")
