"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, a click outside the
volume, the wrong checkpoint) raises :class:`Sam3DError` with one sentence that
says what is wrong and what to do. The command line turns it into that message
and exit code 2, never a traceback.
"""


class Sam3DError(Exception):
    """An error caused by the user's input, with a message meant for them."""

    exit_code = 2
