"""The one splitter: training / validation / test lists of cases, by case.

Rules every bundle follows: the test split is never used to choose a model, so
validation is always carved from the training cases (seeded), never from the test
cases; a dataset's own lists are kept when it has them; every fallback is logged;
the three lists are disjoint by case (checked).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)

SPLITS = ("training", "validation", "test")

T = TypeVar("T")


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)``: at least one test case from 3 cases on, one validation
    case whenever two or more remain for training and validation."""
    if n < 0 or not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
        raise ValueError(f"bad split request: n={n}, fractions {val_fraction}, {test_fraction}")
    n_test = max(1, round(n * test_fraction)) if n >= 3 and test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if n - n_test >= 2 and val_fraction > 0 else 0
    return n - n_val - n_test, n_val, n_test


def carve(
    cases: Sequence[T],
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int | None = 0,
    key: Callable[[T], Any] | None = None,
) -> dict[str, list[T]]:
    """Split ``cases`` into ``training`` / ``validation`` / ``test`` (sizes: :func:`split_sizes`).

    With a ``seed`` the cases are sorted (by ``key``) and shuffled with it, so the split
    does not depend on the order files were listed in; with ``seed=None`` the given order
    is kept (training first, then validation, then test).
    """
    order = list(cases)
    if seed is not None:
        order = sorted(order, key=key or _case_key)
        random.Random(int(seed)).shuffle(order)
    n_train, n_val, _ = split_sizes(len(order), val_fraction, test_fraction)
    return {
        "training": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def complete_splits(
    given: dict[str, list[dict[str, Any]]],
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    source: str = "the dataset",
) -> dict[str, list[dict[str, Any]]]:
    """Fill the splits a dataset does not list, from its training cases only.

    ``given`` maps split names to case dicts (``{"image": ..., ...}``); missing or empty
    ``validation`` / ``test`` lists are carved from ``training`` (seeded), each carve
    logged; with fewer than two training cases validation stays empty (never filled from
    another split). Raises :class:`Sam3DError` when lists overlap or none is for training.
    """
    out = {k: list(given.get(k) or []) for k in SPLITS}
    if not out["training"]:
        raise Sam3DError(f"{source} lists no training cases")
    need_val, need_test = not out["validation"], not out["test"]
    if need_val or need_test:
        carved = carve(
            out["training"],
            val_fraction if need_val else 0.0,
            test_fraction if need_test else 0.0,
            seed,
        )
        out["training"] = carved["training"]
        for split, needed in (("validation", need_val), ("test", need_test)):
            if needed:
                out[split] = carved[split]
                if not carved[split]:
                    continue
                logger.warning(
                    f"splits: {source} has no {split} list; carved {len(carved[split])} of its "
                    f"training cases for it (seed {seed})"
                )
    check_disjoint(out, source)
    return out


def _case_key(case: Any) -> str:
    if isinstance(case, dict):
        return str(case.get("image", case))
    return str(case)


def check_disjoint(splits: dict[str, list[Any]], source: str = "the dataset") -> None:
    """Raise :class:`Sam3DError` if a case (by its ``image``) is in two splits."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for case in splits.get(split) or []:
            name = _case_key(case)
            if name in seen and seen[name] != split:
                raise Sam3DError(f"{source}: {name} is in both {seen[name]} and {split}")
            seen[name] = split


def case_names(cases: Sequence[Any], limit: int = 480) -> str:
    """The cases' file names, comma-separated and cut to ``limit`` characters (an MLflow
    parameter value holds at most 500)."""
    names = ", ".join(_case_key(c).replace("\\", "/").rsplit("/", 1)[-1] for c in cases)
    return names if len(names) <= limit else names[: limit - 3] + "..."
