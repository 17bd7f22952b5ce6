"""The prostate (DeSAM) bundle's glue, one concept a module; every name is re-exported
here, as the bundle's configs call it (``$sam3d.apps.prostate.X``).

- :mod:`.data`: phantoms when empty, ``dataset.json``'s cases, leave-sites-out splits;
- :mod:`.slices`: the reference's slice preprocessing, volume <-> slice stack;
- :mod:`.training`: the embedding cache of ground-truth slices, ``prepare_batch``, poly LR;
- :mod:`.inference`: volume-by-slice automatic segmentation (inference.json's pieces);
- :mod:`.evaluation`: 3D Dice per patient, per-case and per-site CSV, MLflow.
"""

from sam3d.apps.prostate.data import ensure_dataset, load_cases, prostate_datalist
from sam3d.apps.prostate.evaluation import dice_3d, evaluate_cases
from sam3d.apps.prostate.inference import (
    LoadSlicesd,
    SaveMaskd,
    SliceInferer,
    SliceMasksToVolumed,
    VolumeEvaluator,
    clean_box_masks,
    inference_datalist,
    segment_files,
    segment_volume,
    zero_border,
)
from sam3d.apps.prostate.slices import (
    PREPROCESS,
    CaseSlices,
    case_slices,
    cubic_resize,
    label_to_mask,
    masks_to_volume,
    slice_to_input,
    volume_slices,
    volume_to_uint8,
)
from sam3d.apps.prostate.training import (
    DeSAMPrepareBatch,
    SliceLossMetric,
    cache_dir_for,
    cached_slices,
    poly_lambda,
)

__all__ = [
    "PREPROCESS",
    "CaseSlices",
    "DeSAMPrepareBatch",
    "LoadSlicesd",
    "SaveMaskd",
    "SliceInferer",
    "SliceLossMetric",
    "SliceMasksToVolumed",
    "VolumeEvaluator",
    "cache_dir_for",
    "cached_slices",
    "case_slices",
    "clean_box_masks",
    "cubic_resize",
    "dice_3d",
    "ensure_dataset",
    "evaluate_cases",
    "inference_datalist",
    "label_to_mask",
    "load_cases",
    "masks_to_volume",
    "poly_lambda",
    "prostate_datalist",
    "segment_files",
    "segment_volume",
    "slice_to_input",
    "volume_slices",
    "volume_to_uint8",
    "zero_border",
]
