"""Block specs for block-wise conditioning, parsed without ComfyUI: bounded however long or large."""

from __future__ import annotations

import pytest

from x2i.uvit.block_conditioning import MAX_BLOCK_INDEX, MAX_SPEC_CHARS, BlockSpecError, parse_blocks
from x2i_testing import cost_of


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
    cost = cost_of('parse_blocks("input:0-3000000")', setup="from x2i.uvit.block_conditioning import parse_blocks")
    assert cost["error"].startswith("BlockSpecError") and cost["seconds"] < 0.1 and cost["peak_mib"] < 5, cost
