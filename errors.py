"""The one error family of the pack: everything it reports to a user (bad input, a wrong or broken file, a
refused setting, a training run that cannot start or go on) is an :class:`X2IError` whose message names the
problem and the fix."""

from __future__ import annotations


class X2IError(ValueError):
    """A problem the user can fix, said in the message. A ``ValueError``, so ComfyUI shows the message on the
    node that raised it and callers that catch ``ValueError`` keep working; the trainer's command line prints
    any of them as one ``error:`` line and exits with status 2."""


class X2IFileNotFoundError(X2IError, FileNotFoundError):
    """A model or input file that a name does not lead to; also a ``FileNotFoundError`` for callers that
    catch that."""
