"""The bundles' shared progress bar (sam3d.engine.progress.ProgressBar) on plain ignite engines."""

from __future__ import annotations

import pytest
from ignite.engine import Engine, Events

from sam3d.engine.progress import ProgressBar


def _engine(losses=None):
    losses = iter(losses or [])

    def step(engine, batch):
        return {"loss": next(losses, 1.0)}

    return Engine(step)


def test_one_bar_over_every_epoch_with_the_running_loss():
    bar = ProgressBar(desc="training")
    engine = _engine([1.0, 0.0] * 10)
    seen = {}
    bar.attach(engine)
    totals = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: totals.append(bar.bar.total))
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.update(n=bar.bar.n))
    engine.run(range(4), max_epochs=3)
    # one bar for the whole run: 3 epochs x 4 iterations, counted to the end
    assert set(totals) == {12}
    assert seen["n"] == 12
    assert bar.bar is None  # closed on COMPLETED
    # exponential average of 1, 0, 1, 0, ... (0.9 / 0.1), by hand
    expected = 1.0
    for i in range(1, 12):
        expected = 0.9 * expected + 0.1 * (0.0 if i % 2 else 1.0)
    assert bar._loss == pytest.approx(expected)


def test_a_resumed_run_counts_only_what_is_left():
    bar = ProgressBar()
    engine = _engine()
    bar.attach(engine)
    totals = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: totals.append(bar.bar.total))
    engine.load_state_dict({"max_epochs": 5, "epoch_length": 4, "iteration": 8})
    engine.run(range(4))
    assert totals[0] == 12  # epochs 3-5 of 4 iterations
    assert len(totals) == 12


def test_exceptions_still_propagate_and_disabled_draws_nothing():
    def boom(engine, batch):
        raise ValueError("broken step")

    engine = Engine(boom)
    ProgressBar().attach(engine)
    with pytest.raises(ValueError, match="broken step"):
        engine.run(range(2), max_epochs=1)

    off = ProgressBar(enabled=False)
    engine = _engine()
    off.attach(engine)
    engine.run(range(2), max_epochs=1)
    assert off.bar is None and not engine._event_handlers.get(Events.ITERATION_COMPLETED)


def test_outputs_without_a_loss_count_steps_only():
    bar = ProgressBar(desc="evaluation", unit="case")
    engine = Engine(lambda e, b: [{"pred": b}])
    bar.attach(engine)
    ns = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: ns.append(bar.bar.n))
    engine.run(range(5), max_epochs=1)
    assert ns == [1, 2, 3, 4, 5] and bar._loss is None


def test_default_workers_never_exceed_the_cpus_a_process_may_use(monkeypatch):
    import os

    from sam3d.engine.options import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers(4) == 2 and default_workers(1) == 1 and default_workers(0) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers(4) == 4


def test_exit_promptly_ends_only_the_bundle_command(monkeypatch):
    import os
    import sys
    import types

    from sam3d.engine import shutdown

    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    shutdown.exit_promptly()  # under pytest: nothing happens
    assert exits == [] and not shutdown.started_as_bundle_command()
    fake = types.ModuleType("__main__")
    fake.__spec__ = types.SimpleNamespace(name="monai.bundle.__main__")
    monkeypatch.setitem(sys.modules, "__main__", fake)
    assert shutdown.started_as_bundle_command()
    shutdown.exit_promptly()
    assert exits == [0]
