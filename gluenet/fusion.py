"""GlueGen's training-free multimodal fusion of two conditionings by top-K token concatenation."""

from __future__ import annotations

import torch

from ..errors import X2IError


def top_k_fusion(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """``cat([a[:, :K], b[:, :K], (a[:, 2K:] + b[:, 2K:]) / 2], dim=1)``: same length as the inputs.

    The first K tokens of each modality are kept whole (they carry most of the meaning: small K lets
    ``a`` dominate less, large K lets the leading tokens of both dominate) and the rest is averaged.
    A batch of 1 broadcasts against a larger batch.
    """
    if a.ndim != 3 or b.ndim != 3:
        raise X2IError(f"top-K fusion needs [batch, tokens, channels] tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise X2IError(
            f"top-K fusion needs conditionings of the same length and width, got {a.shape[1]}x{a.shape[2]} and "
            f"{b.shape[1]}x{b.shape[2]}: fuse conditionings made for the same model (e.g. two GlueGen outputs, or a "
            "GlueGen output and a CLIPTextEncode of a prompt under 77 tokens)"
        )
    tokens = a.shape[1]
    if not 0 <= 2 * k <= tokens:
        raise X2IError(f"K must be between 0 and {tokens // 2} for {tokens}-token conditionings, got {k}")
    if a.shape[0] != b.shape[0]:
        if 1 not in (a.shape[0], b.shape[0]):
            raise X2IError(f"top-K fusion cannot pair batches of {a.shape[0]} and {b.shape[0]}: use equal batches or one of 1")
        batch = max(a.shape[0], b.shape[0])
        a, b = a.expand(batch, -1, -1), b.expand(batch, -1, -1)
    b = b.to(device=a.device, dtype=a.dtype)
    return torch.cat([a[:, :k], b[:, :k], (a[:, 2 * k:] + b[:, 2 * k:]) / 2], dim=1)


def average_pooled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The pooled vector of a fused SDXL conditioning: the mean of both inputs' (as the tokens past 2K are), a
    batch of 1 broadcast as in :func:`top_k_fusion`."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise X2IError(f"top-K fusion needs pooled vectors of one width, got {tuple(a.shape)} and {tuple(b.shape)}: fuse "
                       "conditionings made for the same model")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise X2IError(f"top-K fusion cannot pair batches of {a.shape[0]} and {b.shape[0]}: use equal batches or one of 1")
    return (a + b.to(device=a.device, dtype=a.dtype)) / 2
