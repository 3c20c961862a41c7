"""Top-K multimodal fusion: exactly GlueGen's formula, batch-aware, with clear refusals."""

from __future__ import annotations

import pytest
import torch

from x2i.gluenet.fusion import top_k_fusion


def _reference(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    # Token by token, as the paper describes it: K of a, K of b, then the mean of the remaining positions.
    rows = []
    for i in range(a.shape[0]):
        tokens = [a[i, t] for t in range(k)] + [b[i, t] for t in range(k)]
        tokens += [(a[i, t] + b[i, t]) / 2 for t in range(2 * k, a.shape[1])]
        rows.append(torch.stack(tokens))
    return torch.stack(rows)


@pytest.mark.device
@pytest.mark.parametrize("k", [0, 3, 5, 7, 38])
def test_formula_matches_the_paper(k, device):
    g = torch.Generator().manual_seed(k)
    a, b = torch.randn(2, 77, 768, generator=g), torch.randn(2, 77, 768, generator=g)
    fused = top_k_fusion(a.to(device), b.to(device), k)
    assert fused.shape == (2, 77, 768) and fused.device.type == device.type
    torch.testing.assert_close(fused.cpu(), _reference(a, b, k))
    # In bfloat16 the formula is exact but for the rounding of the one mean it takes.
    half = top_k_fusion(a.to(device, torch.bfloat16), b.to(device, torch.bfloat16), k)
    torch.testing.assert_close(half.cpu(), _reference(a.bfloat16(), b.bfloat16(), k))


def test_a_single_conditioning_broadcasts_over_a_batch():
    a, b = torch.randn(3, 77, 8), torch.randn(1, 77, 8)
    torch.testing.assert_close(top_k_fusion(a, b, 4), _reference(a, b.expand(3, -1, -1), 4))


def test_three_modalities_chain():
    a, b, c = (torch.randn(1, 77, 8) for _ in range(3))
    ab = top_k_fusion(a, b, 3)
    abc = top_k_fusion(ab, c, 3)
    torch.testing.assert_close(abc[:, :3], a[:, :3])
    torch.testing.assert_close(abc[:, 3:6], c[:, :3])


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="same length and width, got 77x768 and 154x768"):
        top_k_fusion(torch.zeros(1, 77, 768), torch.zeros(1, 154, 768), 3)
    with pytest.raises(ValueError, match="77x768 and 77x1024"):
        top_k_fusion(torch.zeros(1, 77, 768), torch.zeros(1, 77, 1024), 3)
    with pytest.raises(ValueError, match="K must be between 0 and 38"):
        top_k_fusion(torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), 39)
    with pytest.raises(ValueError, match="batches of 2 and 3"):
        top_k_fusion(torch.zeros(2, 77, 8), torch.zeros(3, 77, 8), 3)
