"""Block-wise conditioning: chosen U-Net blocks attend to one prompt, the others to KSampler's."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..block_conditioning import (
    DEFAULT_BLOCKS,
    BlockContextPatch,
    BlockSpecError,
    cross_attention_blocks,
    cross_attention_width,
    format_blocks,
    parse_blocks,
)
from ..errors import X2IError
from .common import CATEGORY, X2INode

logger = logging.getLogger(__name__)

BLOCKS_TOOLTIP = (
    "Blocks that attend to conditioning_blocks, comma-separated: middle, input:N, output:N, ranges like output:3-5, "
    "or input / output for all of them. SD1.x blocks with cross-attention: input:1,2,4,5,7,8, middle, output:3-11. "
    "Empty: the model is unchanged."
)


class X2IBlockConditioning(X2INode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="X2IBlockConditioning",
            display_name="X2I Block Conditioning",
            category=f"{CATEGORY}/conditioning",
            description="Intermediate fusion on an SD U-Net: the chosen blocks (default: the middle block, as in the "
            "paper) attend to conditioning_blocks, every other block to KSampler's positive (e.g. the empty prompt). "
            "The negative is left as it is in every block.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2 or SDXL U-Net MODEL."),
                io.Conditioning.Input(
                    "conditioning_blocks",
                    tooltip="What the chosen blocks see, e.g. your prompt from CLIP Text Encode with the checkpoint's CLIP.",
                ),
                io.String.Input("blocks", default=DEFAULT_BLOCKS, tooltip=BLOCKS_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="A clone of the MODEL whose chosen blocks attend to conditioning_blocks.")],
        )

    @classmethod
    def check_inputs(cls, blocks: str | None = None, **_) -> str | None:
        try:
            parse_blocks(blocks) if blocks is not None else None
        except BlockSpecError as exc:
            return str(exc)
        return None

    @classmethod
    def execute(cls, model, conditioning_blocks: list, blocks: str) -> io.NodeOutput:
        unet = model.get_model_object("diffusion_model")
        chosen = parse_blocks(blocks, cross_attention_blocks(unet))
        if len(conditioning_blocks) != 1:
            raise X2IError(
                f"conditioning_blocks holds {len(conditioning_blocks)} conditionings; connect one (Conditioning Combine "
                "averages two predictions, which has no meaning inside one block: use Conditioning Concat or Average)"
            )
        context = conditioning_blocks[0][0]
        width = cross_attention_width(unet)
        if width is not None and context.shape[-1] != width:
            raise X2IError(
                f"conditioning_blocks is {context.shape[-1]} wide but this U-Net's cross-attention takes {width}: "
                "encode it with the CLIP of the same checkpoint"
            )
        patched = model.clone()
        if chosen:
            patched.set_model_attn2_patch(BlockContextPatch(context, chosen))
            logger.info("Block conditioning: %s attend to conditioning_blocks", format_blocks(chosen))
        return io.NodeOutput(patched)
