"""The U-ViT backbone: the paper's parameter counts and FLOPs, attention through SDPA, ComfyUI's
operations, and clear errors for inputs that do not fit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support import DATA_DIR, REPO_ROOT
from x2i.uvit import PAPER_SETTINGS, UViT, UViTConfig, UViTConfigError, UViTInputError, timestep_embedding
from x2i.uvit.flops import uvit_cost
from x2i.uvit.model import fit_text_context

# Paper Table 1 (U-ViT-Small, 32×32×4 latents, batch 1) and the design note's ablations.
PAPER_PARAMS = {
    "concat-early": 44_692_644,
    "concat-intermediate": 47_843_492,
    "cross-early": 44_692_644,
    "cross-intermediate": 47_843_492,
    "cross-intermediate[1,0]": 47_843_492,
    "cross-intermediate[0,4]": 44_692_644,
}
PAPER_GFLOPS = {"concat-early": 29.56, "concat-intermediate": 25.84, "cross-early": 23.82, "cross-intermediate": 23.66}
# docs: shared/design/ifvit.md, an independent rebuild counting each linear/conv layer once.
REBUILD_GFLOPS = {
    "concat-early": 29.49,
    "concat-intermediate": 25.77,
    "cross-early": 23.76,
    "cross-intermediate": 23.59,
    "cross-intermediate[1,0]": 24.24,
    "cross-intermediate[0,4]": 23.11,
}


# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def costs():
    return {name: uvit_cost(config) for name, config in PAPER_SETTINGS.items()}


@pytest.fixture(scope="module")
def official():
    return json.loads((DATA_DIR / "uvit_official_layouts.json").read_text())


def tiny_config(conditioning: str = "cross", fusion: str = "intermediate", **overrides) -> UViTConfig:
    fields = dict(image_size=8, patch_size=2, width=64, depth=4, heads=2, context_dim=24, text_tokens=7)
    fields.update(conditioning=conditioning, fusion=fusion)
    if fusion == "intermediate":
        fields.update(n_image=1, n_text=1)
    return UViTConfig(**(fields | overrides))


def tiny_inputs(config: UViTConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    t = torch.rand(batch, generator=g) * 999 + 1
    context = torch.randn(batch, config.text_tokens, config.context_dim, generator=g)
    return x, t, context


def tiny_model(config: UViTConfig, seed: int = 0) -> UViT:
    torch.manual_seed(seed)
    model = UViT(config).eval()
    with torch.no_grad():  # U-ViT's init has zero biases and tiny weights; make every path count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# --- sizes and FLOPs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_are_exact(name, costs, official):
    assert costs[name].params == PAPER_PARAMS[name]
    assert costs[name].params == official["param_counts"][name]  # the authors' classes


def test_block_and_skip_sizes_match_the_design_note():
    model = UViT(PAPER_SETTINGS["concat-early"], device="meta")
    assert sum(p.numel() for p in model.mid_block.parameters()) == 3_150_848
    assert sum(p.numel() for p in model.joint_skip_blocks[0].skip_linear.parameters()) == 524_800
    assert model.config.num_blocks == 13


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_gflops_are_within_half_a_percent_of_the_paper(name, costs):
    assert costs[name].gflops == pytest.approx(PAPER_GFLOPS[name], rel=0.005)


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_paper_figures_are_the_layers_outside_the_blocks_counted_twice(name, costs):
    # The paper's table is ours + 0.069 GF, one constant: patch and context embeddings, head and final
    # conv counted a second time. That reproduces every printed value to its two decimals.
    assert round(costs[name].paper_convention_gflops, 2) == PAPER_GFLOPS[name]
    assert costs[name].outside_blocks_flops == 69_238_784


@pytest.mark.parametrize("name", sorted(REBUILD_GFLOPS))
def test_gflops_match_the_independent_rebuild(name, costs):
    assert round(costs[name].gflops, 2) == REBUILD_GFLOPS[name]


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_flops_equal_the_authors_code(name, costs, official):
    theirs = official["official_cost"][name]
    # Their head also maps the time token before dropping it (2 · 512 · 16 FLOPs); ours drops it first.
    assert costs[name].linear_conv_flops + 2 * 512 * 16 == theirs["linear_conv_flops"]
    assert costs[name].attention_flops == theirs["attention_flops"]


def test_original_uvit_costs_the_same_but_its_head_on_all_334_tokens(costs, official):
    theirs = official["official_cost"]["uvit_mscoco_small"]
    assert theirs["params"] == PAPER_PARAMS["concat-early"]
    assert costs["concat-early"].linear_conv_flops + 2 * 78 * 512 * 16 == theirs["linear_conv_flops"]


def test_intermediate_fusion_is_cheaper_than_early(costs):
    g = {name: cost.gflops for name, cost in costs.items()}
    assert g["concat-early"] > g["concat-intermediate"] > g["cross-early"] > g["cross-intermediate"]
    assert 1 - g["concat-intermediate"] / g["concat-early"] == pytest.approx(0.126, abs=0.002)


def test_flops_scale_with_batch():
    config = PAPER_SETTINGS["cross-intermediate"]
    one, four = uvit_cost(config, batch=1), uvit_cost(config, batch=4)
    assert four.linear_conv_flops == 4 * one.linear_conv_flops
    assert four.gflops == pytest.approx(one.gflops)


# --- attention -----------------------------------------------------------------------------------


def explicit_attention(q, k, v, *args, **kwargs):
    assert not args and not kwargs
    weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return weights @ v


@pytest.mark.parametrize("conditioning", ["concat", "cross"])
@pytest.mark.parametrize("fusion", ["early", "intermediate"])
def test_attention_runs_through_sdpa_and_equals_softmax_attention(conditioning, fusion, monkeypatch):
    config = tiny_config(conditioning, fusion)
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        y = model(x, t, context)
    assert len(calls) == config.num_blocks + config.n_text
    image, text = config.num_patches + 1, config.text_tokens
    if conditioning == "cross":  # queries from image + time, keys/values also from text in joint blocks
        assert (image, image + text) in calls and all(q in (image, text) for q, _ in calls)
    else:
        assert (image + text, image + text) in calls
    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    with torch.no_grad():
        reference = model(x, t, context)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=1e-5)


def test_text_only_changes_the_output_through_the_middle_blocks():
    config = tiny_config("cross", "intermediate")
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x, t, context + 1)
        model.joint_blocks[0].attn.kv.weight.zero_()
        model.mid_block.attn.kv.weight.zero_()
        model.joint_skip_blocks[0].attn.kv.weight.zero_()
        c1, c2 = model(x, t, context), model(x, t, context + 1)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c1, c2)  # no joint block reads text: the text has no way in


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0, 10.0]), 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(10 * freqs), torch.sin(10 * freqs)]))


# --- inputs --------------------------------------------------------------------------------------


def test_wrong_latent_channels_are_named():
    config = tiny_config()
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    with pytest.raises(UViTInputError, match="latent has 16 channels but this U-ViT expects 4"):
        model(torch.zeros(2, 16, 8, 8), t, context)


def test_wrong_context_width_is_named():
    config = tiny_config()
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    with pytest.raises(UViTInputError, match="text conditioning is 1024 wide but this U-ViT expects 24"):
        model(x, t, torch.zeros(2, 7, 1024))
    full = UViT(PAPER_SETTINGS["cross-intermediate"], device="meta")
    with pytest.raises(UViTInputError, match="1024 wide but this U-ViT expects 768 \\(CLIP ViT-L/14"):
        full(torch.zeros(1, 4, 32, 32, device="meta"), torch.zeros(1, device="meta"), torch.zeros(1, 77, 1024, device="meta"))


def test_a_long_conditioning_is_cut_to_one_chunk_and_another_width_refused(caplog):
    config = PAPER_SETTINGS["cross-intermediate"]
    two_chunks = torch.randn(1, 154, 768)
    with caplog.at_level("WARNING"):
        assert torch.equal(fit_text_context(two_chunks, config), two_chunks[:, :77])
    assert "the prompt is 154 tokens long (2 CLIP chunks)" in caplog.text and "only the first 77 are used" in caplog.text
    one_chunk = torch.randn(2, 77, 768)
    assert fit_text_context(one_chunk, config) is one_chunk
    with pytest.raises(UViTInputError, match="is 1024 wide but this U-ViT takes 768-wide text \\(CLIP ViT-L/14 features: Load CLIP"):
        fit_text_context(torch.zeros(1, 77, 1024), config)
    with pytest.raises(UViTInputError, match="has 50 tokens but this U-ViT takes exactly 77"):
        fit_text_context(torch.zeros(1, 50, 768), config)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, t, c: (x[..., :4, :4], t, c), "latent is 4×4 but this U-ViT was trained on 8×8"),
        (lambda x, t, c: (x[0], t, c), r"must be a \[B, C, H, W\] tensor"),
        (lambda x, t, c: (x, t, torch.cat([c, c], 1)), "has 14 tokens but this U-ViT has position embeddings for exactly 7"),
        (lambda x, t, c: (x, t, c[0]), r"must be \[B, tokens, width\]"),
        (lambda x, t, c: (x, t, torch.cat([c, c])), "batch 4 but the latent has batch 2"),
        (lambda x, t, c: (x, t, None), "needs a text conditioning"),
        (lambda x, t, c: (x, torch.zeros(3), c), r"timesteps must be \[B\] = \[2\]"),
    ],
)
def test_bad_inputs_are_refused_clearly(change, message):
    config = tiny_config()
    model = tiny_model(config)
    with pytest.raises(UViTInputError, match=message):
        model(*change(*tiny_inputs(config)))


def test_one_timestep_and_one_context_broadcast_over_the_batch():
    config = tiny_config()
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    with torch.no_grad():
        full = model(x, torch.full((2,), 500.0), context[:1].expand(2, -1, -1))
        torch.testing.assert_close(model(x, 500.0, context[:1]), full)
        torch.testing.assert_close(model(x, torch.tensor([500.0]), context[:1]), full)


def test_comfyui_keywords_are_accepted():
    config = tiny_config()
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    with torch.no_grad():
        y = model(x, t, context=context, control=None, transformer_options={"patches": {}})
    assert y.shape == x.shape


# --- construction --------------------------------------------------------------------------------


class CastingOps:
    """Stands in for comfy.ops.manual_cast: no init, weights cast to the input's dtype at run time."""

    made: list[str] = []

    class Linear(nn.Linear):
        def reset_parameters(self):
            CastingOps.made.append("Linear")

        def forward(self, x):
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    class LayerNorm(nn.LayerNorm):
        def reset_parameters(self):
            CastingOps.made.append("LayerNorm")

        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    class Conv2d(nn.Conv2d):
        def reset_parameters(self):
            CastingOps.made.append("Conv2d")

        def forward(self, x):
            return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_comfyui_operations_build_the_network_from_unet_config_keywords():
    config = tiny_config("cross", "intermediate")
    reference = tiny_model(config)
    CastingOps.made.clear()
    # How comfy.model_base.BaseModel builds it: unet_model(**unet_config, device=..., operations=...).
    unet_config = config.to_dict() | {"dtype": torch.float16}
    model = UViT(**unet_config, device="cpu", operations=CastingOps)
    assert model.dtype == torch.float16 and model.pos_embed.dtype == torch.float16
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {CastingOps.Linear}
    assert set(CastingOps.made) == {"Linear", "LayerNorm", "Conv2d"}  # constructed by the ops, not re-initialised
    model.load_state_dict(reference.state_dict())
    x, t, context = tiny_inputs(config)
    with torch.no_grad():
        y = model(x, t, context)  # float32 compute on float16 storage
        expected = tiny_model(config).to(torch.float16).float()(x, t, context)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_bfloat16_forward_keeps_its_dtype():
    config = tiny_config("concat", "intermediate")
    model = tiny_model(config).to(torch.bfloat16)
    x, t, context = tiny_inputs(config)
    with torch.no_grad():
        y = model(x.bfloat16(), t, context.bfloat16())
        y32 = tiny_model(config)(x, t, context)
    assert y.dtype == torch.bfloat16
    assert (y.float() - y32).abs().max() < 0.1 * y32.abs().max()


def test_default_init_is_uvits():
    model = UViT(tiny_config("concat", "early"))
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.mid_block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.mid_block.attn.proj.bias.abs().max() == 0 and model.norm.weight.min() == 1
    assert model.mid_block.attn.qkv.bias is None  # no qkv bias


def test_a_config_or_its_fields_but_not_both():
    config = tiny_config()
    assert UViT(**config.to_dict(), device="meta").config == config
    with pytest.raises(TypeError, match="either a UViTConfig or its fields"):
        UViT(config, width=32)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(fusion="late"), "unknown fusion 'late'"),
        (dict(conditioning="add"), "unknown conditioning 'add'"),
        (dict(fusion="early", n_image=2), "early fusion has no image-only"),
        (dict(fusion="intermediate", n_image=0, n_text=0), "both 0 is early fusion"),
        (dict(fusion="intermediate", n_image=7), "need depth >= 14"),
        (dict(depth=13), "must be even"),
        (dict(width=500), "not divisible by heads 8"),
        (dict(image_size=33), "not a multiple of patch_size"),
        (dict(heads=0), "heads must be a whole number from 1 to 256, got 0"),
        (dict(depth=10**9), "depth must be a whole number from 0 to 256, got 1000000000"),
        (dict(width=1 << 20), "width must be a whole number from 1 to 8192"),
        (dict(image_size="64"), "image_size must be a whole number from 1 to 1024, got '64'"),
    ],
)
def test_bad_configs_are_refused(fields, message):
    with pytest.raises(UViTConfigError, match=message):
        UViTConfig(**fields)


def test_config_defaults_and_round_trip():
    config = UViTConfig(conditioning="cross", fusion="intermediate")
    assert (config.n_image, config.n_text, config.n_joint) == (4, 1, 2)
    assert config.name == "cross-intermediate" and PAPER_SETTINGS["cross-intermediate[1,0]"].name == "cross-intermediate[1,0]"
    assert UViTConfig.from_json(config.to_json()) == config
    future = UViTConfig.from_dict(config.to_dict() | {"rope": True})
    assert future == config and future.extra == {"rope": True}


def test_imports_without_comfyui():
    code = (
        "import sys; sys.path.insert(0, 'tests'); import support; import x2i.uvit, x2i.uvit.flops; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
