"""Parameters and FLOPs of a U-ViT, counted by ``torch.utils.flop_counter`` (no hand arithmetic).

The paper's convention: 2 FLOPs per multiply-add over the linear and convolution layers, attention
products (QKᵀ, AV) not counted, batch 1. FlopCounterMode attributes every counted operation to the
modules it ran in; the linear/conv figure is the sum over ``nn.Linear`` and ``nn.Conv2d`` modules
(ComfyUI's ops subclass them), so attention products, whatever kernel computes them, stay out.
The model is built on the ``meta`` device: nothing is allocated or computed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import UViTConfig
from .model import UViT

BLOCK_LISTS = ("image_blocks", "caption_blocks", "joint_blocks", "mid_block", "joint_skip_blocks", "image_skip_blocks")


@dataclass(frozen=True)
class UViTCost:
    """What one forward pass costs. FLOPs are for ``batch`` samples."""

    name: str
    params: int
    batch: int
    linear_conv_flops: int  # every nn.Linear / nn.Conv2d, 2 per multiply-add
    attention_flops: int  # QKᵀ and AV (FlopCounterMode's count for the attention kernel)
    outside_blocks_flops: int  # linear/conv outside the transformer blocks: patch/context embed, head, final conv

    @property
    def gflops(self) -> float:
        """Linear and conv GFLOPs per sample: the figure the paper's table reports."""
        return self.linear_conv_flops / self.batch / 1e9

    @property
    def paper_convention_gflops(self) -> float:
        """``gflops`` plus the layers outside the blocks counted a second time: this reproduces the
        printed values of the paper's Table 1 to their two decimals (see bench/uvit_flops.py)."""
        return (self.linear_conv_flops + self.outside_blocks_flops) / self.batch / 1e9

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            gflops=round(self.gflops, 4),
            attention_gflops=round(self.attention_flops / self.batch / 1e9, 4),
            paper_convention_gflops=round(self.paper_convention_gflops, 4),
            params_m=round(self.params / 1e6, 3),
        )
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str = "", batch: int = 1) -> UViTCost:
    """Run ``model(*inputs)`` under FlopCounterMode and split the count by module type.

    Works on any module tree with U-ViT-style names (also the authors' own classes), so the same
    counter can be pointed at a reference implementation.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = sum(counts.get("Global", {}).values())
    linear_conv = outside = 0
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            flops = sum(counts.get(f"{root}.{path}", {}).values())
            linear_conv += flops
            if path.split(".", 1)[0] not in BLOCK_LISTS:
                outside += flops
    return UViTCost(
        name=name,
        params=count_parameters(model),
        batch=batch,
        linear_conv_flops=int(linear_conv),
        attention_flops=int(total - linear_conv),
        outside_blocks_flops=int(outside),
    )


def uvit_cost(config: UViTConfig, batch: int = 1, device: str | torch.device = "meta") -> UViTCost:
    """Parameters and per-forward FLOPs of ``config`` at ``batch`` (on ``meta``: shapes only)."""
    model = UViT(config, device=device, init_weights=False).eval()
    c = config
    x = torch.zeros(batch, c.in_channels, c.image_size, c.image_size, device=device)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.zeros(batch, c.text_tokens, c.context_dim, device=device)
    return measure(model, (x, t, context), name=config.name, batch=batch)
