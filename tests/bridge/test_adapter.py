"""The LaVi-Bridge TextAdapter: official numbers, official folder layout, released sizes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from support import DATA_DIR
from support.cost import cost_of
from x2i.bridge.adapter import (
    RELEASED_ADAPTERS,
    TextAdapter,
    TextAdapterConfig,
    check_widths,
    load_adapter,
)
from x2i.bridge.errors import LaViBridgeFileError

GOLDEN = DATA_DIR / "lavibridge_adapter_golden.safetensors"
LAYOUTS = json.loads((DATA_DIR / "lavibridge_adapter_layouts.json").read_text())
# The config.json that the official TextAdapter's save_pretrained wrote for the golden adapter.
OFFICIAL_CONFIG = json.loads((DATA_DIR / "lavibridge_adapter_config.json").read_text())


def _golden() -> tuple[list[int], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        args = json.loads(f.metadata()["args"])
        state = {k.removeprefix("state."): f.get_tensor(k) for k in f.keys() if k.startswith("state.")}
        return args, state, f.get_tensor("input"), f.get_tensor("output")


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _write_official_folder(folder, config: dict, state: dict[str, torch.Tensor], fmt: str = "bin"):
    """What diffusers' save_pretrained writes: config.json + diffusion_pytorch_model.{bin,safetensors}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if fmt == "bin":
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_official_outputs_are_reproduced():
    args, state, x, expected = _golden()
    model = TextAdapter(TextAdapterConfig(*args))
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        y = model.eval()(x)
    assert y.shape == expected.shape == (2, 5, args[2])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)


def test_golden_records_its_provenance():
    with safe_open(str(GOLDEN), framework="pt") as f:
        assert "ShihaoZhaoZSH/LaVi-Bridge" in f.metadata()["source"]


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_folder_loads(tmp_path, fmt):
    args, state, x, expected = _golden()
    folder = _write_official_folder(tmp_path / "adapter", OFFICIAL_CONFIG, state, fmt)
    model = load_adapter(folder)
    assert model.config == TextAdapterConfig(*args)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)


def test_official_config_fields_are_what_the_loader_reads():
    assert OFFICIAL_CONFIG["_class_name"] == "TextAdapter"
    assert {"in_dim", "int_dim", "out_dim"} <= set(OFFICIAL_CONFIG)


@pytest.mark.parametrize("name", sorted(RELEASED_ADAPTERS))
def test_released_layouts_match_the_official_class(name):
    config = RELEASED_ADAPTERS[name]
    assert [config.in_dim, config.int_dim, config.out_dim] == LAYOUTS["args"][name]
    assert config.name == config.released_pair == name
    other_width = TextAdapterConfig(config.in_dim, 64, config.out_dim)
    assert (other_width.name, other_width.released_pair) == (None, name)  # a trained adapter's own int_dim
    with torch.device("meta"):
        model = TextAdapter(config)
    assert _shapes(model) == LAYOUTS["layouts"][name]
    assert sum(p.numel() for p in model.parameters()) == LAYOUTS["param_counts"][name]


def test_released_parameter_counts():
    assert LAYOUTS["param_counts"] == {"t5_unet": 21_254_528, "llama2_unet": 228_920_192, "t5_transformer": 113_288_704}


def test_strict_load_names_the_mismatch(tmp_path):
    args, state, _, _ = _golden()
    broken = dict(state)
    broken.pop("norm2.bias")
    broken["ff1.net.2.weight"] = torch.zeros(3, 3)
    folder = _write_official_folder(tmp_path / "adapter", OFFICIAL_CONFIG, broken)
    with pytest.raises(LaViBridgeFileError, match=r"missing 1 \(e\.g\. norm2\.bias\).*wrong shapes 1 \(e\.g\. ff1\.net\.2\.weight"):
        load_adapter(folder)


def test_config_and_weights_of_different_sizes_are_refused(tmp_path):
    _, state, _, _ = _golden()  # a (16, 12, 8) adapter
    config = dict(OFFICIAL_CONFIG, out_dim=4)
    folder = _write_official_folder(tmp_path / "adapter", config, state)
    with pytest.raises(LaViBridgeFileError, match=r"TextAdapter\(16, 12, 4\).*wrong shapes 2.*same release"):
        load_adapter(folder)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda f: None, "folder not found"),
        (lambda f: f.mkdir(), "no config.json"),
        (lambda f: (f.mkdir(), (f / "config.json").write_text("{not json")), "not readable JSON"),
        (lambda f: (f.mkdir(), (f / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')), "not a LaVi-Bridge TextAdapter"),
        (lambda f: (f.mkdir(), (f / "config.json").write_text('{"in_dim": 4, "out_dim": 4}')), "lacks int_dim"),
        (lambda f: (f.mkdir(), (f / "config.json").write_text('{"in_dim": 4, "int_dim": 4, "out_dim": 4}')), "no adapter weights"),
    ],
)
def test_folder_problems_are_named(tmp_path, setup, message):
    folder = tmp_path / "adapter"
    setup(folder)
    with pytest.raises(LaViBridgeFileError, match=message):
        load_adapter(folder)


def test_lora_list_in_place_of_weights_is_recognised(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    torch.save([torch.zeros(4, 2), torch.zeros(2, 4)], folder / "diffusion_pytorch_model.bin")
    with pytest.raises(LaViBridgeFileError, match="holds a list.*LoRA"):
        load_adapter(folder)


def test_check_widths_names_both_sides():
    adapter = RELEASED_ADAPTERS["t5_unet"]
    check_widths(adapter, 1024, 768)
    with pytest.raises(LaViBridgeFileError, match=r"takes 1024-wide .* gives 4096.*gives 768-wide .* expects 2048"):
        check_widths(adapter, 4096, 2048)
    with pytest.raises(LaViBridgeFileError, match="expects 4096"):
        check_widths(TextAdapter(TextAdapterConfig(8, 4, 6)), 8, 4096)


def test_forward_refuses_the_wrong_width():
    with pytest.raises(ValueError, match="width 8, got 6"):
        TextAdapter(TextAdapterConfig(8, 4, 6))(torch.zeros(1, 2, 6))


def test_config_rejects_nonsense_sizes():
    with pytest.raises(LaViBridgeFileError, match="int_dim must be a whole number from 1 to 16384, got 0"):
        TextAdapterConfig(8, 0, 6)
    with pytest.raises(LaViBridgeFileError, match="in_dim must be a whole number from 1 to 16384, got 1000000"):
        TextAdapterConfig(10**6, 8, 6)


def test_a_config_describing_a_huge_adapter_is_refused_before_anything_is_allocated(tmp_path):
    # 16384 -> 16384 -> 16384 at the limits: ~2.4e9 parameters (9.6 GB) described by a 2-tensor folder.
    import json

    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"in_dim": 16384, "int_dim": 16384, "out_dim": 16384}))
    save_file({"norm1.weight": torch.ones(2), "norm1.bias": torch.zeros(2)}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(LaViBridgeFileError, match=r"does not fit the TextAdapter\(16384, 16384, 16384\) of its config.json: missing"):
        load_adapter(folder)
    cost = cost_of(f"load_adapter({str(folder)!r})", setup="from x2i.bridge.adapter import load_adapter")
    assert cost["error"].startswith("LaViBridgeFileError") and cost["peak_mib"] < 100 and cost["seconds"] < 30, cost
