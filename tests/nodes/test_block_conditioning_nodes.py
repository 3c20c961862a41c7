"""Block-wise conditioning on an SD1.5-architecture U-Net (ComfyUI's own UNetModel, narrowed to 32
channels so a CPU runs it): only the chosen blocks' cross-attention sees the other prompt, only for
the positive half of the CFG batch, and an empty choice is the unpatched model."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from support.comfy_sampling import narrow_model, sample_latent
from support.sd15_unet import SD15_BLOCKS
from x2i.block_conditioning import (
    BlockSpecError,
    cross_attention_blocks,
    cross_attention_width,
    format_blocks,
    parse_blocks,
)

# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet(comfy):
    return narrow_model("sd1")


def text(seed: int, tokens: int = 77, width: int = 768) -> torch.Tensor:
    return torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(seed))


def cond(tensor: torch.Tensor) -> list:
    return [[tensor, {}]]


class Capture:
    """An attn2_patch added after the node's: what each block's cross-attention receives."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[str, int], list[int], torch.Tensor]] = []

    def __call__(self, n, context, value, extra):
        assert value is context or torch.equal(value, context)
        self.calls.append(((extra["block"][0], extra["block"][1]), list(extra["cond_or_uncond"]), context.clone()))
        return n, context, value

    def blocks(self) -> list[tuple[str, int]]:
        return [block for block, _, _ in self.calls]


# Block-conditioning's sampling: an 8x8 latent, one step at CFG 5 on a CFG batch of 2 unless a test says otherwise.
sample = partial(sample_latent, side=8, steps=1, cfg=5.0, batch=2)


def patched(pack, unet, block_text, blocks="middle"):
    return pack.X2IBlockConditioning.execute(unet, cond(block_text), blocks).result[0]


# --- the blocks string ------------------------------------------------------------------------------


def test_the_sd15_unet_has_the_blocks_comfyui_names(unet):
    assert cross_attention_blocks(unet.model.diffusion_model) == SD15_BLOCKS
    assert cross_attention_width(unet.model.diffusion_model) == 768
    assert format_blocks(SD15_BLOCKS) == ",".join(
        ["input:1", "input:2", "input:4", "input:5", "input:7", "input:8", "middle", *(f"output:{i}" for i in range(3, 12))]
    )


def test_validation_checks_the_syntax_before_the_graph_runs(pack):
    assert pack.X2IBlockConditioning.validate_inputs(blocks="middle") is True
    assert pack.X2IBlockConditioning.validate_inputs(blocks="input:7,output:3-11") is True
    assert "cannot read block 'centre'" in pack.X2IBlockConditioning.validate_inputs(blocks="centre")


# --- what each block attends to ---------------------------------------------------------------------


@pytest.mark.parametrize("blocks", ["middle", "input:7,input:8,middle,output:3"])
def test_only_the_chosen_blocks_positive_half_sees_the_block_conditioning(pack, unet, blocks):
    positive, negative, block_text = text(1), text(2), text(3)
    model = patched(pack, unet, block_text, blocks)
    capture = Capture()
    model.set_model_attn2_patch(capture)
    sample(model, positive, negative, batch=2)
    chosen = set(parse_blocks(blocks, SD15_BLOCKS))
    assert capture.blocks() == list(SD15_BLOCKS)  # one CFG batch holding cond and uncond, every block once
    for block, flags, context in capture.calls:
        assert sorted(flags) == [0, 1] and context.shape == (4, 77, 768)
        for chunk, flag in enumerate(flags):
            rows = context[2 * chunk : 2 * chunk + 2]
            expected = negative if flag == 1 else block_text if block in chosen else positive
            torch.testing.assert_close(rows, expected.expand(2, -1, -1), msg=f"{block} chunk {flag}")


def test_the_unpatched_model_is_untouched_and_an_empty_choice_changes_nothing(pack, unet):
    positive, negative, block_text = text(1), text(2), text(3)
    reference = sample(unet, positive, negative, steps=2)
    assert "patches" not in unet.model_options["transformer_options"]
    unchanged = patched(pack, unet, block_text, blocks="")
    torch.testing.assert_close(sample(unchanged, positive, negative, steps=2), reference, rtol=0, atol=0)
    middle = patched(pack, unet, block_text)
    assert (sample(middle, positive, negative, steps=2) - reference).abs().max() > 1e-4
    torch.testing.assert_close(sample(unet, positive, negative, steps=2), reference, rtol=0, atol=0)


def test_a_longer_block_conditioning_is_exact_by_repetition(pack, unet):
    """The positive's own 77 tokens, given twice (154 tokens, as a long prompt encodes), change nothing:
    attention over keys repeated k times is attention over them once."""
    positive, negative = text(1), text(2)
    reference = sample(unet, positive, negative, steps=2)
    doubled = torch.cat([positive, positive], dim=1)
    out = sample(patched(pack, unet, doubled, "input,middle,output"), positive, negative, steps=2)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    # A long KSampler prompt (154 tokens) with a one-chunk block text: the middle block's positive rows see
    # the block text repeated to 154 tokens, every other block the long prompt, the negative rows (repeated
    # by ComfyUI to 154) the negative everywhere.
    long_positive, block_text = torch.cat([positive, text(4)], dim=1), text(3)
    model = patched(pack, unet, block_text)
    capture = Capture()
    model.set_model_attn2_patch(capture)
    out = sample(model, long_positive, negative, steps=1)
    assert capture.blocks() == list(SD15_BLOCKS) and torch.isfinite(out).all()
    for block, flags, context in capture.calls:
        assert sorted(flags) == [0, 1] and context.shape == (4, 154, 768)
        for chunk, flag in enumerate(flags):
            expected = negative if flag == 1 else block_text if block == ("middle", 0) else None
            expected = long_positive if expected is None else torch.cat([expected, expected], dim=1)
            torch.testing.assert_close(context[2 * chunk : 2 * chunk + 2], expected.expand(2, -1, -1), rtol=0, atol=0,
                                       msg=f"{block} chunk {flag}")


def test_without_cfg_only_the_positive_runs_and_is_patched(pack, unet):
    positive, negative, block_text = text(1), text(2), text(3)
    model = patched(pack, unet, block_text)
    capture = Capture()
    model.set_model_attn2_patch(capture)
    sample(model, positive, negative, batch=3, cfg=1.0)
    middle = [(flags, ctx) for block, flags, ctx in capture.calls if block == ("middle", 0)]
    assert [flags for flags, _ in middle] == [[0]]
    torch.testing.assert_close(middle[0][1], block_text.expand(3, -1, -1))


# --- the patch on its own ---------------------------------------------------------------------------


# --- bad inputs -------------------------------------------------------------------------------------


def test_a_conditioning_of_another_width_is_refused(pack, unet):
    with pytest.raises(ValueError, match="conditioning_blocks is 1024 wide but this U-Net's cross-attention takes 768"):
        patched(pack, unet, text(1, width=1024))


def test_a_combined_conditioning_is_refused(pack, unet):
    with pytest.raises(ValueError, match="conditioning_blocks holds 2 conditionings; connect one"):
        pack.X2IBlockConditioning.execute(unet, cond(text(1)) + cond(text(2)), "middle")


def test_a_block_the_model_lacks_is_refused(pack, unet):
    with pytest.raises(BlockSpecError, match="output:0 has no cross-attention in this U-Net"):
        patched(pack, unet, text(1), "middle,output:0")


def test_a_model_without_unet_blocks_is_refused(pack, comfy):
    import comfy.model_patcher

    from x2i.nodes.uvit import UViTModelConfig
    from x2i.uvit import SamplingConvention, UViTConfig

    config = UViTModelConfig(UViTConfig(image_size=4, width=64, depth=2, heads=1), SamplingConvention())
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(config.get_model(), load_device=cpu, offload_device=cpu)
    with pytest.raises(BlockSpecError, match="works on SD-style U-Nets .*not on UViT"):
        patched(pack, model, text(1))


# --- other U-Nets -----------------------------------------------------------------------------------

def test_an_sdxl_unet_gets_its_own_blocks_and_width(pack, comfy):
    import comfy.sample

    unet = narrow_model("sdxl")
    model = unet.model
    assert cross_attention_blocks(model.diffusion_model) == (
        ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0), *(("output", i) for i in range(6)),
    )
    with pytest.raises(ValueError, match="768 wide but this U-Net's cross-attention takes 2048"):
        patched(pack, unet, text(1))
    with pytest.raises(BlockSpecError, match="input:1 has no cross-attention"):
        patched(pack, unet, text(1, width=2048), "input:1")
    block_text = text(3, width=2048)
    sdxl = patched(pack, unet, block_text, "middle,output:0")
    capture = Capture()
    sdxl.set_model_attn2_patch(capture)
    pooled = {"pooled_output": torch.zeros(1, 1280)}  # SDXL's ADM input
    latent = torch.zeros(1, 4, 8, 8)
    comfy.sample.sample(sdxl, comfy.sample.prepare_noise(latent, 0), 1, 5.0, "euler", "normal",
                        [[text(1, width=2048), pooled]], [[text(2, width=2048), pooled]], latent, disable_pbar=True, seed=0)
    for block, flags, context in capture.calls:
        positive = context[flags.index(0)]
        expected = block_text[0] if block in (("middle", 0), ("output", 0)) else text(1, width=2048)[0]
        torch.testing.assert_close(positive, expected, msg=str(block))
