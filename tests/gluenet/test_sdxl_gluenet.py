"""GlueNets for SDXL: the config says the family and carries the measured norms, the pooled head pools the
translated tokens, and the file format keeps SD1.x files readable by every pack while an SDXL file tells an
older pack to update."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from x2i.gluenet import GlueNet, GlueNetConfig, GlueNetConfigError, GlueNetFileError, load_gluenet, save_gluenet
from x2i.gluenet.checkpoint import FORMAT_VERSION, FORMAT_VERSION_SDXL
from x2i.gluenet.scaling import clip_tensor_norm, per_token_norm

NORMS = tuple(10.0 + i for i in range(77))


def sdxl_config(**changes) -> GlueNetConfig:
    values = dict(architecture="translator_noln", num_tokens=77, in_dim=16, out_dim=2048, depth=1, target="sdxl",
                  pooled_dim=1280, output_norm=NORMS, pooled_norm=2.5)
    return GlueNetConfig(**(values | changes))


def test_translate_with_pooled_is_the_network_the_head_and_the_file_norms():
    torch.manual_seed(0)
    gluenet = GlueNet(sdxl_config(input_divisor=3.0)).eval()
    x = torch.randn(2, 77, 16)
    tokens, pooled = gluenet.translate_with_pooled(x)
    raw = gluenet(x / 3)
    torch.testing.assert_close(tokens, raw * torch.tensor(NORMS)[None, :, None] / 2)
    # The head by hand: LayerNorm, a softmax over the 77 token scores, the weighted sum, the MLP; times pooled_norm.
    head = gluenet.pooled_head
    h = torch.nn.functional.layer_norm(raw, (2048,), head.norm.weight, head.norm.bias)
    weights = torch.softmax(h @ head.score.weight[0] + head.score.bias, dim=1)
    summary = (weights[..., None] * h).sum(1)
    expected = head.mlp[2](torch.nn.functional.gelu(head.mlp[0](summary))) * 2.5
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(gluenet.translate(x), tokens)
    # Reordering the tokens a pooled head reads does not change what it pools to.
    perm = torch.randperm(77)
    torch.testing.assert_close(head(raw[:, perm]), head(raw), atol=1e-5, rtol=1e-5)


def test_an_sd1_gluenet_has_no_pooled_vector_and_clip_norms():
    gluenet = GlueNet(GlueNetConfig("translator_noln", num_tokens=77, in_dim=16, out_dim=768, depth=1))
    tokens, pooled = gluenet.translate_with_pooled(torch.randn(1, 77, 16))
    assert pooled is None and tokens.shape == (1, 77, 768) and not hasattr(gluenet, "pooled_head")
    assert torch.equal(gluenet.output_scale, clip_tensor_norm() / 2)
    assert gluenet.config.family.name == "SD1.x"


def test_per_token_norm_is_the_mean_l2_norm_of_each_position():
    targets = torch.zeros(2, 77, 4)
    targets[0, :, 0] = 3.0
    targets[1, :, 1] = 4.0
    targets[1, 5, 2] = 3.0  # norm 5 at position 5 of the second target
    norms = per_token_norm(targets)
    assert norms[0] == pytest.approx(3.5) and norms[5] == pytest.approx(4.0) and len(norms) == 77


@pytest.mark.parametrize("changes, message", [
    ({"out_dim": 768}, "a GlueNet for SDXL outputs 77 x 2048 tokens and a 1280-wide pooled vector, this one 77 x 768 and 1280"),
    ({"pooled_dim": 0}, "a GlueNet for SDXL outputs 77 x 2048 tokens and a 1280-wide pooled vector, this one 77 x 2048 and 0"),
    ({"target": "sd1"}, "a GlueNet for SD1.x has no pooled head"),
    ({"target": "sd3"}, "GlueNet target 'sd3' is not a model family this pack knows"),
    ({"output_norm": (1.0,) * 76}, "output_norm must be 77 positive numbers"),
    ({"output_norm": (0.0,) * 77}, "output_norm must be 77 positive numbers"),
    ({"pooled_norm": 0.0}, "pooled_norm must be positive"),
])
def test_impossible_sdxl_configs_are_refused(changes, message):
    with pytest.raises(GlueNetConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sdxl_config(**changes)


def test_sdxl_files_load_exactly_and_say_format_2_while_sd1_files_stay_format_1(tmp_path):
    torch.manual_seed(1)
    sdxl = GlueNet(sdxl_config()).eval()
    save_gluenet(sdxl, tmp_path / "sdxl.safetensors")
    loaded = load_gluenet(tmp_path / "sdxl.safetensors")
    assert loaded.config == sdxl.config and loaded.config.output_norm == NORMS
    x = torch.randn(1, 77, 16)
    for mine, theirs in zip(loaded.translate_with_pooled(x), sdxl.translate_with_pooled(x), strict=True):
        assert torch.equal(mine, theirs)
    sd1 = GlueNet(GlueNetConfig("translator_noln", num_tokens=77, in_dim=16, out_dim=768, depth=1))
    save_gluenet(sd1, tmp_path / "sd1.safetensors")
    versions = {}
    for name in ("sdxl", "sd1"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as handle:
            versions[name] = handle.metadata()["format_version"]
    assert versions == {"sdxl": FORMAT_VERSION_SDXL, "sd1": FORMAT_VERSION} == {"sdxl": "2", "sd1": "1"}


def test_a_newer_format_is_refused_with_update_the_node_pack(tmp_path):
    config = json.loads(sdxl_config().to_json())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "future.safetensors"),
              metadata={"format": "x2i.gluenet", "format_version": "3", "config": json.dumps(config)})
    with pytest.raises(GlueNetFileError, match=r"format version '3' is not supported by this ComfyUI-X2I \(supports 1, 2\); update the node pack"):
        load_gluenet(tmp_path / "future.safetensors")
