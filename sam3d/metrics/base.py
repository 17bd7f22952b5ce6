"""What the cumulative metrics share: a buffer of per-case values and MONAI's reduction.

:class:`CaseMetric` is a MONAI ``CumulativeIterationMetric`` whose ``_compute_tensor``
returns one value per case and class (``B x C``); ``aggregate`` reduces the buffer with
MONAI's ``do_metric_reduction`` (NaN cases skipped), honouring ``reduction`` and
``get_not_nans`` as MONAI's own metrics do. A metric whose buffer holds something else
(counts, bin statistics) overrides :meth:`CaseMetric.case_values` or ``aggregate``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction


class CaseMetric(CumulativeIterationMetric):
    """Base of the project's cumulative metrics (see the module docstring).

    Args:
        include_background: keep channel 0 when there are several channels (subclasses
            that select channels read it).
        reduction, get_not_nans: as in MONAI's metrics.
    """

    def __init__(
        self,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def buffer(self) -> torch.Tensor:
        """The accumulated buffer, ``N x ...`` over every case so far."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        return data

    def case_values(self) -> torch.Tensor:
        """Per-case values ``N x C`` from the buffer (the buffer itself by default)."""
        return self.buffer()

    def aggregate(self, reduction: MetricReduction | str | None = None) -> Any:
        f, not_nans = do_metric_reduction(self.case_values(), reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f
