"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, a click outside the
volume, the wrong checkpoint) raises :class:`Sam3DError` with one sentence that
says what is wrong and what to do. The command line turns it into that message
and exit code 2, never a traceback.
"""


class Sam3DError(Exception):
    """An error caused by the user's input, with a message meant for them."""

    exit_code = 2


def find_user_error(exc: BaseException) -> Sam3DError | None:
    """The :class:`Sam3DError` behind ``exc``, if any: itself, or one it was raised from.

    MONAI wraps what a transform raises (``RuntimeError: applying transform ...``) and
    ignite re-raises from handlers; the user's error is then in the chain of causes.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, Sam3DError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
