"""The fixed output scale of the official GlueNets."""

from __future__ import annotations

import torch

# Per-position mean L2 norm of CLIP ViT-L/14 text hidden states (position 0 is BOS), copied from the
# official GlueGen code. GlueNets are trained on targets divided by TENSOR_NORM / 2 and their
# outputs are multiplied back ("overnorm" in the released file names).
CLIP_L_TENSOR_NORM: tuple[float, ...] = (
    43.8203, 28.3668, 27.9345, 28.0084, 28.2958, 28.2576, 28.3373, 28.2695, 28.4097, 28.2790,
    28.2825, 28.2807, 28.2775, 28.2708, 28.2682, 28.2624, 28.2589, 28.2611, 28.2616, 28.2639,
    28.2613, 28.2566, 28.2615, 28.2665, 28.2799, 28.2885, 28.2852, 28.2863, 28.2780, 28.2818,
    28.2764, 28.2532, 28.2412, 28.2336, 28.2514, 28.2734, 28.2763, 28.2977, 28.2971, 28.2948,
    28.2818, 28.2676, 28.2831, 28.2890, 28.2979, 28.2999, 28.3117, 28.3363, 28.3554, 28.3626,
    28.3589, 28.3597, 28.3543, 28.3660, 28.3731, 28.3717, 28.3812, 28.3753, 28.3810, 28.3777,
    28.3693, 28.3713, 28.3670, 28.3691, 28.3679, 28.3624, 28.3703, 28.3703, 28.3720, 28.3594,
    28.3576, 28.3562, 28.3438, 28.3376, 28.3389, 28.3433, 28.3191,
)


def clip_tensor_norm(norms: tuple[float, ...] | None = None) -> torch.Tensor:
    """``[T, 1]`` float32 tensor of per-token norms: ``norms`` (a GlueNet's measured ones), else
    :data:`CLIP_L_TENSOR_NORM`."""
    return torch.tensor(CLIP_L_TENSOR_NORM if norms is None else norms, dtype=torch.float32).unsqueeze(1)


def per_token_norm(targets: torch.Tensor) -> tuple[float, ...]:
    """GlueGen's ``tensor_norm`` of other targets: the mean L2 norm of each token position over ``[N, T, D]``."""
    return tuple(float(v) for v in targets.float().norm(dim=-1).mean(dim=0))
