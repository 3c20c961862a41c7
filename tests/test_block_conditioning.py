"""Block-wise conditioning without ComfyUI: block specs parsed (and bounded however long or large), the rows
the patch replaces, and the patch itself; the node on ComfyUI's U-Net is tested in tests/nodes/test_block_conditioning_nodes.py."""

from __future__ import annotations

import pytest
import torch

from support.cost import cost_of
from support.sd15_unet import SD15_BLOCKS
from x2i.block_conditioning import (
    MAX_BLOCK_INDEX,
    MAX_SPEC_CHARS,
    BlockContextPatch,
    BlockSpecError,
    parse_blocks,
    replace_positive_rows,
)


@pytest.mark.parametrize(("spec", "message"), [
    ("input:0-3000000", r"block 3000000 is past the last block of any U-Net \(the highest index is 63"),
    (f"output:{MAX_BLOCK_INDEX + 1}", "block 64 is past the last block"),
    ("input:" + "9" * 5000, rf"has 5006 characters \(at most {MAX_SPEC_CHARS}\)"),
    (",".join(["middle"] * 200), rf"has 1399 characters \(at most {MAX_SPEC_CHARS}\)"),
], ids=["huge-range", "one-past-the-limit", "huge-number", "long-list"])
def test_huge_specs_are_refused_naming_the_limit(spec, message):
    with pytest.raises(BlockSpecError, match=message):
        parse_blocks(spec)


def test_the_largest_accepted_spec_is_cheap():
    assert len(parse_blocks(f"input:0-{MAX_BLOCK_INDEX},output:0-{MAX_BLOCK_INDEX},middle")) == 2 * (MAX_BLOCK_INDEX + 1) + 1
    cost = cost_of('parse_blocks("input:0-3000000")', setup="from x2i.block_conditioning import parse_blocks")
    assert cost["error"].startswith("BlockSpecError") and cost["seconds"] < 0.1 and cost["peak_mib"] < 5, cost


@pytest.mark.parametrize(("spec", "expected"), [
    ("middle", [("middle", 0)]),
    ("", []),
    (" Middle:0 ", [("middle", 0)]),
    ("input:7,input:8,middle,output:3", [("input", 7), ("input", 8), ("middle", 0), ("output", 3)]),
    ("output:3-5, input : 8", [("output", 3), ("output", 4), ("output", 5), ("input", 8)]),
    ("input", [("input", i) for i in (1, 2, 4, 5, 7, 8)]),
    ("middle,middle", [("middle", 0)]),
])
def test_blocks_strings(spec, expected):
    assert list(parse_blocks(spec, SD15_BLOCKS)) == expected
    parse_blocks(spec)  # the syntax alone, as validate_inputs checks it


@pytest.mark.parametrize(("spec", "message"), [
    ("output:0", r"output:0 has no cross-attention in this U-Net; blocks with cross-attention: input:1,input:2,"),
    ("input:0-2", r"input:0 has no cross-attention"),
    ("mid", r"cannot read block 'mid': write middle, input:N"),
    ("input:8-7", r"runs backwards"),
    ("middle:1", r"one middle block"),
])
def test_bad_blocks_strings_are_named(spec, message):
    with pytest.raises(BlockSpecError, match=message):
        parse_blocks(spec, SD15_BLOCKS)


def test_row_replacement_batches_and_lengths():
    context = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3)  # chunks [uncond, cond] of 2 rows, 2 tokens
    replacement = -torch.ones(1, 3, 3)
    out = replace_positive_rows(context, replacement, [1, 0])
    assert out.shape == (4, 6, 3)  # lcm(2, 3) tokens
    torch.testing.assert_close(out[:2], context[:2].repeat(1, 3, 1))
    torch.testing.assert_close(out[2:], -torch.ones(2, 6, 3))
    per_row = torch.stack([torch.full((2, 3), 7.0), torch.full((2, 3), 8.0)])
    torch.testing.assert_close(replace_positive_rows(context, per_row, [0, 1])[:2], per_row)
    with pytest.raises(ValueError, match="has batch 3 but each prompt runs a batch of 2"):
        replace_positive_rows(context, torch.zeros(3, 2, 3), [0, 1])
    with pytest.raises(ValueError, match="block conditioning is 5 wide but this cross-attention takes 3-wide"):
        replace_positive_rows(context, torch.zeros(1, 2, 5), [0, 1])


def test_patch_moves_with_the_model_and_ignores_other_blocks():
    patch = BlockContextPatch(torch.ones(1, 77, 8), [("middle", 0)])
    n, ctx = torch.zeros(2, 16, 8), torch.zeros(2, 77, 8)
    assert patch(n, ctx, ctx, {"block": ("input", 7), "cond_or_uncond": [0, 1]})[1] is ctx
    assert patch(n, ctx, ctx, {"cond_or_uncond": [0]})[1] is ctx  # no block: not a U-Net transformer
    assert patch.to("cpu") is patch and "middle" in repr(patch)
