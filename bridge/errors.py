"""Errors shared by the LaVi-Bridge modules (adapter, language models, LoRA)."""

from __future__ import annotations

from ..errors import X2IError


class LaViBridgeFileError(X2IError):
    """A LaVi-Bridge file or folder that cannot be used; the message names the problem and the fix."""
