"""What every bundle's MONAI engines share: tracking, checkpoints, clipping, reporting,
distributed helpers and the click inferers (bundle-specific glue lives in :mod:`sam3d.apps`).

- :mod:`.tracking`: :class:`MLflowRun` / :class:`MLflowRunHandler` (one run per training);
- :mod:`.checkpointing`: :class:`TrainingCheckpoint` (best ``model.pt``, resumable ``last.pt``);
- :mod:`.clipping`: :class:`GradientClipping` (accumulation- and AMP-aware);
- :mod:`.reporting`: :class:`CaseMetricsCSV`, :func:`write_csv`, :func:`save_executed_config`,
  :func:`checked`;
- :mod:`.options`: :func:`as_bool` (``--resume false`` on the command line is False);
- :mod:`.distributed`: :func:`is_rank0`, :func:`barrier`, :func:`unwrap`;
- :mod:`.progress`: :class:`ProgressBar` (a tqdm bar with an ETA over a whole run);
- :mod:`.shutdown`: :func:`exit_promptly` (a bundle command ends when its work ends);
- :mod:`.trained`: :func:`trained_checkpoint` (evaluate / inference build the network a
  checkpoint was trained as);
- :mod:`.clicks`: :func:`click_prepare_batch`, :class:`ClickCropInferer`,
  :class:`CentreClickNetwork`;
- :mod:`.interactive`: :class:`InteractiveClickInferer` (simulated correction rounds with
  the mask prompt), :func:`training_inferer`, :func:`training_prepare_batch`,
  :func:`click_training_mode`;
- :mod:`.click_validation`: :class:`ClickCurveValidation` (the validation split's click
  curve, NoC@85 and positive clicks inside, every ``val_interval`` epochs);
"""

from sam3d.engine.checkpointing import TrainingCheckpoint
from sam3d.engine.click_validation import ClickCurveValidation
from sam3d.engine.clicks import (
    CentreClickNetwork,
    ClickCropInferer,
    click_prepare_batch,
)
from sam3d.engine.clipping import GradientClipping
from sam3d.engine.distributed import barrier, is_rank0, unwrap
from sam3d.engine.interactive import (
    InteractiveClickInferer,
    click_training_mode,
    training_inferer,
    training_prepare_batch,
)
from sam3d.engine.options import as_bool
from sam3d.engine.progress import ProgressBar
from sam3d.engine.reporting import CaseMetricsCSV, checked, save_executed_config, write_csv
from sam3d.engine.resume import atomic_torch_save, read_resume_state
from sam3d.engine.shutdown import exit_promptly
from sam3d.engine.tracking import MLflowRun, MLflowRunHandler
from sam3d.engine.trained import describe_preset, trained_checkpoint

__all__ = [
    "CaseMetricsCSV",
    "CentreClickNetwork",
    "ClickCurveValidation",
    "ClickCropInferer",
    "GradientClipping",
    "InteractiveClickInferer",
    "MLflowRun",
    "MLflowRunHandler",
    "ProgressBar",
    "TrainingCheckpoint",
    "as_bool",
    "atomic_torch_save",
    "barrier",
    "checked",
    "click_prepare_batch",
    "click_training_mode",
    "describe_preset",
    "exit_promptly",
    "is_rank0",
    "read_resume_state",
    "save_executed_config",
    "trained_checkpoint",
    "training_inferer",
    "training_prepare_batch",
    "unwrap",
    "write_csv",
]
