"""SDXL's pooled vector made from translated tokens: the pooled head of SDXL GlueNets and LaVi-Bridge adapters.

SDXL's U-Net reads, beside its 77 x 2048 tokens, OpenCLIP ViT-bigG's projected end token (1280 wide) through its
class embedding (Podell et al. 2023, SDXL §2.1). A GlueNet or a bridge adapter makes tokens from another encoder;
this head makes the pooled vector from those tokens.
"""

from __future__ import annotations

import torch
from torch import nn


class PooledHead(nn.Module):
    """The pooled vector from translated tokens: softmax attention pooling with one learned score per token,
    then a two-layer MLP to the pooled width.

    SDXL's pooled vector is OpenCLIP bigG's projected end token, which sits wherever the prompt ends; after a
    GlueNet's token mixing, or in another language model's tokens, no fixed position stands for it. A learned pool can weight whichever
    tokens carry the summary (the end-token-like ones), whatever the prompt's length, at the cost of one
    score per width plus the MLP (6.8 M parameters at 2048 -> 1280), and it reads the
    translated tokens themselves, so pooled vector and tokens tell the U-Net the same thing. Input: the
    tokens before any output scaling (a GlueNet divides its pooled target by ``pooled_norm``).
    """

    def __init__(self, width: int, pooled_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.score = nn.Linear(width, 1)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, pooled_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        weights = self.score(h).float().softmax(dim=1).to(h.dtype)
        return self.mlp((weights * h).sum(dim=1))
