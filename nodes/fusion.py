"""Training-free multimodal fusion of two conditionings (GlueGen's top-K token concatenation)."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..errors import X2IError
from ..gluenet.fusion import average_pooled, top_k_fusion
from .common import CATEGORY, X2INode, require_valid

logger = logging.getLogger(__name__)


class X2ITopKFusion(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2ITopKFusion",
            display_name="X2I Top-K Fusion",
            category=f"{CATEGORY}/gluegen",
            description="Mixes two conditionings of the same shape (e.g. a sound and a style prompt): the first K tokens "
            "of each, then the average of the rest; SDXL's pooled vectors are averaged. Small K lets the first input "
            "lead; K near 10 lets text lead. Chain two nodes for three modalities.",
            inputs=[
                io.Conditioning.Input("conditioning_a", tooltip="Its first K tokens come first; its options are kept."),
                io.Conditioning.Input("conditioning_b", tooltip="Its first K tokens follow a's; the rest is averaged with a's."),
                io.Int.Input("k", default=5, min=0, max=38, tooltip="GlueGen's demo uses 3 to 7."),
            ],
            outputs=[io.Conditioning.Output(tooltip="[a's first K, b's first K, the average of the rest]: as long as a and b.")],
        )

    @classmethod
    def execute(cls, conditioning_a: list, conditioning_b: list, k: int) -> io.NodeOutput:
        require_valid(cls, k=k)  # a linked k skipped validation
        if not conditioning_a or not conditioning_b:
            raise X2IError("X2I Top-K Fusion needs two non-empty conditionings")
        if len(conditioning_b) > 1:
            logger.warning("X2I Top-K Fusion: conditioning_b has %d entries; only the first is fused", len(conditioning_b))
        other, other_options = conditioning_b[0]
        fused = []
        for tokens, options in conditioning_a:
            options = dict(options)
            if "pooled_output" in options and "pooled_output" in other_options:
                options["pooled_output"] = average_pooled(options["pooled_output"], other_options["pooled_output"])
            fused.append([top_k_fusion(tokens, other, k), options])
        return io.NodeOutput(fused)
