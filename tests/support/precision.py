"""The half precision a GPU user gets, compared with float32 within a stated bound."""

from __future__ import annotations

import torch

# ---- The --device switch: the same numbers on another device, and in the half precision users get ----

# What a CUDA user gets with dtype "auto": ComfyUI's text-encoder precision, float16, for every encoder the
# pack loads (text encoders, language models, AudioCLIP, CLAP, PointBERT); bfloat16 for the networks that
# run or train in mixed precision (GlueNets, adapters, U-ViT, merged LoRA weights).
ENCODER_HALF = torch.float16
NETWORK_HALF = torch.bfloat16
# Bounds on the relative error ||half - float32|| / ||float32|| of a whole output. Unit roundoff is
# 2^-11 = 4.9e-4 for float16 and 2^-8 = 3.9e-3 for bfloat16; the models here, a few layers deep, measure
# 3e-4..1.5e-3 (float16) and 2e-3..1.5e-2 (bfloat16) on x86 CPUs. The bounds leave room for other kernels
# (cuBLAS, cuDNN, SDPA) while any real mistake (a wrong mask, layer, scale or cast) moves outputs by O(1).
HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """``||actual - reference|| / ||reference||`` over the whole tensor, in float64 on the CPU."""
    actual, reference = actual.detach().cpu().double(), reference.detach().cpu().double()
    return ((actual - reference).norm() / reference.norm()).item()


def assert_close_in_half(actual: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, what: str,
                         tolerance: float | None = None) -> None:
    """``actual`` (computed in ``dtype``) is within ``tolerance`` (default :data:`HALF_TOLERANCE`; a model
    that needs another bound states it, with the measurement, where it is tested) of the float32 ``reference``."""
    bound = HALF_TOLERANCE[dtype] if tolerance is None else tolerance
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(actual).all(), f"{what} in {dtype}: non-finite values"
    error = relative_error(actual, reference)
    assert error <= bound, f"{what} in {dtype}: relative error {error:.2e} > {bound:.0e}"


