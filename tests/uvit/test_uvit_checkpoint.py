"""U-ViT checkpoints: this pack's safetensors, the authors' [image, time, text] layout and U-ViT's
[time, text, image] layout load into one network with the same outputs, equal to the official code's
(golden data from zizhao-hu/U-ViT and baofff/U-ViT, see tests/data/uvit_golden.md)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from support import DATA_DIR
from support.models import splitmix_uniform
from support.precision import NETWORK_HALF, assert_close_in_half
from x2i.uvit import UViT, UViTConfig, UViTFileError, load_uvit, load_uvit_state_dict, probe_uvit_file, save_uvit
from x2i.uvit.checkpoint import (
    LAYOUT_FORK,
    LAYOUT_PACK,
    LAYOUT_UVIT,
    convert_state_dict,
    convert_uvit_file,
    detect_config,
    from_pack_layout,
)
from x2i.uvit.config import PAPER_SETTINGS, SamplingConvention

GOLDEN = DATA_DIR / "uvit_golden.safetensors"
LAYOUTS_JSON = DATA_DIR / "uvit_official_layouts.json"

# The tiny official models behind the golden file. 256 patches are kept: the authors' cross-attention
# mid_block hard-codes l=257 query tokens (libs/uvit_t2i_cross.py), so only 32×32 latents at patch 2
# (or 16×16 at patch 1) run their cross model as intended.
TINY_ARGS = dict(
    img_size=32, patch_size=2, in_chans=4, embed_dim=128, depth=4, num_heads=2, mlp_ratio=2,
    qkv_bias=False, mlp_time_embed=False, clip_dim=32, num_clip_token=77,
)
# case -> (official module, constructor overrides, expected pack config fields)
GOLDEN_CASES: dict[str, tuple[str, dict, dict]] = {
    "fork_concat_early": ("fork.uvit_t2i", dict(c=0, v=0), dict(conditioning="concat", fusion="early")),
    "fork_concat_intermediate": ("fork.uvit_t2i", dict(c=1, v=1), dict(conditioning="concat", fusion="intermediate", n_text=1, n_image=1)),
    "fork_cross_early": ("fork.uvit_t2i_cross", dict(c=0, v=0), dict(conditioning="cross", fusion="early")),
    "fork_cross_intermediate": ("fork.uvit_t2i_cross", dict(c=1, v=1), dict(conditioning="cross", fusion="intermediate", n_text=1, n_image=1)),
    "fork_cross_text_only": ("fork.uvit_t2i_cross", dict(c=2, v=0), dict(conditioning="cross", fusion="intermediate", n_text=2, n_image=0)),
    "fork_concat_image_only": ("fork.uvit_t2i", dict(c=0, v=2), dict(conditioning="concat", fusion="intermediate", n_text=0, n_image=2)),
    "uvit_concat_early": ("baofff.uvit_t2i", dict(qkv_bias=True, mlp_time_embed=True), dict(conditioning="concat", fusion="early", qkv_bias=True, mlp_time_embed=True)),
}
TINY_CONFIG = dict(image_size=32, patch_size=2, in_channels=4, width=128, depth=4, heads=2, mlp_ratio=2.0, context_dim=32)


# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def deterministic_state(layout: dict[str, list[int]], seed: int = 1) -> dict[str, torch.Tensor]:
    """Non-trivial weights for a U-ViT key layout, a pure function of (key, shape, seed): Linear/Conv
    weights with variance 1/fan_in, biases ±0.1, LayerNorm scales 1 ± 0.2, position embedding ±0.5
    (large enough that a wrong token order shows)."""
    state = {}
    for key in sorted(layout):
        shape = tuple(layout[key])
        u = splitmix_uniform(int(np.prod(shape)), seed * 1_000_003 + (zlib.crc32(key.encode()) << 20)).reshape(shape)
        leaf = key.rsplit(".", 1)[-1]
        if key == "pos_embed":
            values = 0.5 * u
        elif leaf == "weight" and len(shape) == 1:  # LayerNorm
            values = 1.0 + 0.2 * u
        elif leaf == "bias":
            values = 0.1 * u
        else:
            values = u * np.sqrt(3.0 / int(np.prod(shape[1:])))
        state[key] = torch.from_numpy(values.astype(np.float32))
    return state


def layout_of(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def golden_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        return f.get_tensor("input.x"), f.get_tensor("input.t"), f.get_tensor("input.context")


def golden_output(case: str) -> torch.Tensor:
    with safe_open(str(GOLDEN), framework="pt") as f:
        return f.get_tensor(f"{case}.output")


def official_layouts() -> dict:
    return json.loads(LAYOUTS_JSON.read_text())


def tiny(conditioning: str = "cross", fusion: str = "intermediate", **overrides) -> UViTConfig:
    fields = dict(TINY_CONFIG, conditioning=conditioning, fusion=fusion)
    if fusion == "intermediate":
        fields.update(n_image=1, n_text=1)
    fields.update(overrides)
    return UViTConfig(**fields)


def random_model(config: UViTConfig, seed: int = 1) -> UViT:
    model = UViT(config, init_weights=False)
    model.load_state_dict(deterministic_state(layout_of(model.state_dict()), seed))
    return model.eval()


def run(model: UViT, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, context)


# --- golden equality with the official classes ---------------------------------------------------


def golden_model(case: str) -> UViT:
    config, state, _ = convert_state_dict(deterministic_state(official_layouts()["tiny"][case]), source=case)
    model = UViT(config, init_weights=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.device
@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_official_outputs_are_reproduced(case, device):
    layout = official_layouts()["tiny"][case]
    official_state = deterministic_state(layout)
    config, state, source_layout = convert_state_dict(official_state, source=case)
    _, overrides, expected = GOLDEN_CASES[case]
    assert source_layout == (LAYOUT_UVIT if case.startswith("uvit") else LAYOUT_FORK)
    assert config == UViTConfig(**dict(TINY_CONFIG, **expected))
    model = golden_model(case).to(device)
    x, t, context = (tensor.to(device) for tensor in golden_inputs())
    y = run(model, x, t, context)
    assert y.device.type == device.type
    torch.testing.assert_close(y.cpu(), golden_output(case), atol=2e-5, rtol=1e-5)


@pytest.mark.device
@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_bfloat16_stays_close_to_the_official_float32_outputs(case, device):
    model = golden_model(case).to(device=device, dtype=NETWORK_HALF)
    x, t, context = golden_inputs()
    y = run(model, x.to(device, NETWORK_HALF), t.to(device), context.to(device, NETWORK_HALF))
    assert y.dtype == NETWORK_HALF
    assert_close_in_half(y, golden_output(case), NETWORK_HALF, case)


def test_golden_file_records_its_provenance():
    with safe_open(str(GOLDEN), framework="pt") as f:
        metadata = f.metadata()
    assert "zizhao-hu/U-ViT" in metadata["source"] and "baofff/U-ViT" in metadata["source"]
    for case, (module, overrides, _) in GOLDEN_CASES.items():
        assert metadata[f"{case}.class"] == f"{module}.UViT"
        assert json.loads(metadata[f"{case}.args"]) == dict(TINY_ARGS, **overrides)


# --- the official full-size layouts --------------------------------------------------------------


@pytest.mark.parametrize("name", ["concat-early", "concat-intermediate", "cross-early", "cross-intermediate", "cross-intermediate[1,0]", "cross-intermediate[0,4]"])
def test_authors_full_size_layouts_are_detected_and_match_the_network(name):
    layouts = official_layouts()
    layout = layouts["paper"][name]
    shapes = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    config, detected_layout = detect_config(shapes)
    assert detected_layout == LAYOUT_FORK
    assert config == PAPER_SETTINGS[name]
    ours = {k: list(v.shape) for k, v in UViT(config, device="meta").state_dict().items()}
    assert ours == layout
    assert sum(int(np.prod(s)) for s in layout.values()) == layouts["param_counts"][name]


def test_released_uvit_mscoco_layout_is_concat_early():
    layout = official_layouts()["uvit_mscoco_small"]
    shapes = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    config, detected_layout = detect_config(shapes)
    assert detected_layout == LAYOUT_UVIT
    assert config == PAPER_SETTINGS["concat-early"]


# --- equivalence of the three layouts ------------------------------------------------------------


def test_same_weights_through_every_layout_give_the_same_output(tmp_path):
    config = tiny("concat", "early")
    model = random_model(config, seed=5)
    x, t, context = golden_inputs()
    expected = run(model, x, t, context)

    fork_path, uvit_path, pack_path, conv_path = (tmp_path / n for n in ("nnet.pth", "nnet_ema.pth", "m.safetensors", "c.safetensors"))
    torch.save(from_pack_layout(model.state_dict(), config, LAYOUT_FORK), fork_path)
    uvit_state = from_pack_layout(model.state_dict(), config, LAYOUT_UVIT)
    assert any(k.startswith("in_blocks.") for k in uvit_state) and not any(k.startswith("joint_blocks.") for k in uvit_state)
    torch.save(uvit_state, uvit_path)
    save_uvit(model, pack_path)
    assert convert_uvit_file(uvit_path, conv_path, heads=2) == config

    for path, layout in ((fork_path, LAYOUT_FORK), (uvit_path, LAYOUT_UVIT), (pack_path, LAYOUT_PACK), (conv_path, LAYOUT_PACK)):
        loaded = load_uvit_state_dict(path, heads=None if layout == LAYOUT_PACK else 2)
        assert loaded.layout == layout, path.name
        assert loaded.config == config
        y = run(load_uvit(path, heads=None if layout == LAYOUT_PACK else 2), x, t, context)
        assert torch.equal(y, expected), path.name  # one network, the same weights: bit-identical


def test_uvit_order_is_a_permutation_of_the_position_embedding():
    config = tiny("concat", "early")
    state = random_model(config).state_dict()
    uvit_state = from_pack_layout(state, config, LAYOUT_UVIT)
    pos, pos_uvit = state["pos_embed"][0], uvit_state["pos_embed"][0]
    n = config.num_patches
    torch.testing.assert_close(pos_uvit[0], pos[n])  # time
    torch.testing.assert_close(pos_uvit[1 : 1 + 77], pos[n + 1 :])  # text
    torch.testing.assert_close(pos_uvit[78:], pos[:n])  # image
    _, back, _ = convert_state_dict(uvit_state, heads=2)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_uvit_layout_holds_concat_early_only():
    config = tiny("cross", "intermediate")
    with pytest.raises(UViTFileError, match="concat-early models only"):
        from_pack_layout(random_model(config).state_dict(), config, LAYOUT_UVIT)


def test_pack_file_keeps_config_and_sampling_in_metadata(tmp_path):
    config = tiny("cross", "intermediate", mlp_ratio=4.0)
    model = random_model(config)
    path = tmp_path / "uvit.safetensors"
    save_uvit(model, path, sampling=SamplingConvention(latent_scale=0.18215))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "x2i.uvit" and json.loads(metadata["config"])["heads"] == 2
    loaded = load_uvit_state_dict(path)
    assert loaded.config == config and loaded.sampling.latent_scale == 0.18215
    assert probe_uvit_file(path) == config
    assert loaded.sampling.timestep_offset == 1
    reloaded = load_uvit(path)
    x, t, context = golden_inputs()
    assert torch.equal(run(reloaded, x, t, context), run(model, x, t, context))


def test_upstream_safetensors_and_prefixed_state_dicts_are_detected(tmp_path):
    config = tiny("cross", "early")
    state = random_model(config).state_dict()
    path = tmp_path / "nnet_ema.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    assert probe_uvit_file(path, heads=2) == config
    loaded = load_uvit_state_dict(path, heads=2)
    assert loaded.layout == LAYOUT_FORK and loaded.config == config
    comfy = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    assert convert_state_dict(comfy, heads=2)[0] == config


def test_heads_default_to_64_wide(tmp_path):
    config = tiny("concat", "early", width=128, heads=2)
    state = random_model(config).state_dict()
    assert detect_config(state)[0].heads == 2  # 128 / 64
    odd = tiny("concat", "early", width=96, heads=3)
    with pytest.raises(UViTFileError, match="give the number of heads"):
        detect_config(random_model(odd).state_dict())
    assert detect_config(random_model(odd).state_dict(), heads=3)[0] == odd


# --- bad files -----------------------------------------------------------------------------------


def test_missing_and_extra_keys_are_named():
    config = tiny("cross", "intermediate")
    state = random_model(config).state_dict()
    missing = dict(state)
    del missing["joint_skip_blocks.0.mlp.fc2.bias"]
    with pytest.raises(UViTFileError, match=r"missing 1 \(e\.g\. joint_skip_blocks\.0\.mlp\.fc2\.bias\)"):
        convert_state_dict(missing, heads=2)
    extra = dict(state, **{"ema_decay": torch.zeros(1)})
    with pytest.raises(UViTFileError, match=r"unexpected 1 \(e\.g\. ema_decay\)"):
        convert_state_dict(extra, heads=2)
    wrong = dict(state, **{"context_embed.bias": torch.zeros(7)})
    with pytest.raises(UViTFileError, match=r"context_embed\.bias: file \(7,\) vs model \(128,\)"):
        convert_state_dict(wrong, heads=2)
    unpaired = {k: v for k, v in state.items() if not k.startswith("image_skip_blocks.")}
    with pytest.raises(UViTFileError, match="1 image_blocks but 0 image_skip_blocks"):
        convert_state_dict(unpaired, heads=2)


def test_other_architectures_are_refused_with_what_was_expected(tmp_path):
    sd_unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3), "first_stage_model.x": torch.zeros(1)}
    with pytest.raises(UViTFileError, match="Stable Diffusion U-Net.*expected a text-to-image U-ViT"):
        convert_state_dict(sd_unet)
    class_conditional = {
        k: v for k, v in random_model(tiny("concat", "early")).state_dict().items() if not k.startswith("context_embed.")
    } | {"label_emb.weight": torch.zeros(1001, 128)}
    with pytest.raises(UViTFileError, match="class-conditional"):
        convert_state_dict(class_conditional)
    with pytest.raises(UViTFileError, match="not a U-ViT: found 1 tensors \\(foo\\)"):
        convert_state_dict({"foo": torch.zeros(1)})
    optimizer = tmp_path / "optimizer.pth"
    torch.save({"state": {}, "param_groups": []}, optimizer)
    with pytest.raises(UViTFileError, match="optimizer state"):
        load_uvit(optimizer)
    text = tmp_path / "nnet.txt"
    text.write_text("x")
    with pytest.raises(UViTFileError, match="unsupported U-ViT file type"):
        load_uvit(text)
    with pytest.raises(UViTFileError, match="not found"):
        load_uvit(tmp_path / "absent.pth")


def test_pickled_code_is_never_loaded(tmp_path):
    path = tmp_path / "nnet.pth"
    torch.save({"pos_embed": torch.zeros(1), "config": object.__new__(SamplingConvention)}, path)
    with pytest.raises(UViTFileError, match="could not be read as a safe PyTorch checkpoint"):
        load_uvit(path)


def test_paper_settings_detect_back_from_their_own_state_dicts():
    for name, config in PAPER_SETTINGS.items():
        shapes = UViT(config, device="meta").state_dict()
        assert detect_config(shapes)[0] == config, name
