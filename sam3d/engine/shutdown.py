"""A bundle run from the command line ends when its work ends.

After "Engine run finished", ``python -m monai.bundle run`` spent 10-30 s on this
2-core machine (1.5-2 min reported on a busy one) in the interpreter's own teardown:
freeing the thousands of modules MONAI, MLflow and torch import, with no Python frame
left to run (``faulthandler`` shows none), plus the DataLoader workers' shutdown.
Nothing is left to do by then: checkpoints are written atomically, the MLflow run is
closed, the logs are flushed here. So the bundles' ``finalize`` calls
:func:`exit_promptly`, which ends the process at once, only when the process is
``python -m monai.bundle`` itself (never inside a test or a notebook that runs a
bundle's workflow).
"""

from __future__ import annotations

import logging
import os
import sys

_BUNDLE_MAIN = "monai.bundle.__main__"


def started_as_bundle_command() -> bool:
    """True when this process is ``python -m monai.bundle ...`` (or torchrun of it)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == _BUNDLE_MAIN


def exit_promptly(code: int = 0) -> None:
    """Flush logs and streams, then end the process without the interpreter's teardown;
    does nothing unless the process is the ``monai.bundle`` command."""
    if not started_as_bundle_command():
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(int(code))
