"""Loading released GlueGen checkpoints exactly, this pack's format, conversion, and bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from support.cost import cost_of
from support.models import official_layout, random_state_dict, reference_tensor_norm_half, reference_translator_noln
from x2i.gluenet import GlueNetFileError, load_gluenet, probe_gluenet_file, save_gluenet
from x2i.gluenet.checkpoint import FORMAT_VERSION, language_from_filename
from x2i.gluenet.convert import main as convert_main


@pytest.fixture(scope="module")
def released_text_ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A full-size multilingual GlueNet in the released format (random weights, official keys/shapes)."""
    state = random_state_dict(official_layout("Translator_noln(77,1024,768,2,5)"), seed=3)
    path = tmp_path_factory.mktemp("released") / "gluenet_Japanese_clip_overnorm_over3_noln.ckpt"
    torch.save(state, path)
    return path, state


def test_released_multilingual_file_loads_strictly_with_the_official_recipe(released_text_ckpt):
    path, state = released_text_ckpt
    model = load_gluenet(path)
    config = model.config
    assert (config.architecture, config.num_tokens, config.in_dim, config.out_dim, config.depth) == ("translator_noln", 77, 1024, 768, 5)
    assert config.language == "ja"
    assert config.input_divisor == 3.0 and config.output_scaling == "tensor_norm_half"
    assert config.encoder_hint == "xlm-roberta-large"
    x = torch.randn(2, 77, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_translator_noln(state, x / 3) * reference_tensor_norm_half()
        got = model.translate(x)
    assert got.shape == (2, 77, 768)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_released_sound_file_loads_with_output_scaling_only(tmp_path):
    state = random_state_dict(official_layout("Translator_w_head(16,77,64,768,4,5)"), seed=4)
    path = tmp_path / "gluenet_sound2img_audioclip_us8k.ckpt"
    torch.save(state, path)
    model = load_gluenet(path)
    assert model.config.architecture == "translator_w_head"
    assert model.config.input_divisor == 1.0 and model.config.language is None
    embedding = torch.nn.functional.normalize(torch.randn(2, 1024), dim=-1)
    with torch.no_grad():
        # GlueGen: z.reshape(B, 16, 1024 // 16), then GlueNet, then x tensor_norm / 2.
        expected = model(embedding.reshape(2, 16, 64)) * reference_tensor_norm_half()
        torch.testing.assert_close(model.translate(embedding), expected)
    with pytest.raises(ValueError, match="expects an embedding of 16 x 64 = 1024 values, but encoder 'clap' gives 512"):
        model.translate(torch.zeros(1, 512), "encoder 'clap'")


def test_pack_format_round_trip_keeps_config_and_numbers(small_text_gluenet_ckpt, tmp_path):
    model = load_gluenet(small_text_gluenet_ckpt)
    out = tmp_path / "nested" / "gluenet_fr.safetensors"
    save_gluenet(model, out, {"trained_by": "test"})
    assert [p.name for p in out.parent.iterdir()] == ["gluenet_fr.safetensors"]  # no temp files left
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "x2i.gluenet" and metadata["trained_by"] == "test"
    again = load_gluenet(out)
    assert again.config == model.config
    x = torch.randn(1, 77, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.translate(x), model.translate(x))


def test_converter_writes_a_file_the_loader_reads(small_text_gluenet_ckpt, tmp_path):
    out = tmp_path / "fr.safetensors"
    assert convert_main([str(small_text_gluenet_ckpt), str(out), "--encoder-hint", "xlm-roberta-tiny"]) == 0
    converted = load_gluenet(out)
    original = load_gluenet(small_text_gluenet_ckpt)
    assert converted.config.language == "fr" and converted.config.encoder_hint == "xlm-roberta-tiny"
    assert probe_gluenet_file(out) == converted.config
    x = torch.randn(1, 77, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted.translate(x), original.translate(x))


def test_safetensors_without_metadata_is_read_as_official_layout(small_text_gluenet_state, tmp_path):
    path = tmp_path / "gluenet_Spanish_clip_overnorm_over3_noln.safetensors"
    save_file(dict(small_text_gluenet_state), str(path))
    config = probe_gluenet_file(path)
    assert (config.architecture, config.language, config.input_divisor) == ("translator_noln", "es", 3.0)
    assert load_gluenet(path).config == config


@pytest.mark.parametrize(
    ("name", "code"),
    [("gluenet_Chinese_clip_overnorm_over3_noln.ckpt", "zh"), ("gluenet_Italian_clip_overnorm_over3_noln.ckpt", "it"),
     ("my-german-gluenet.safetensors", "de"), ("gluenet_sound2img_audioclip_us8k.ckpt", None)],
)
def test_language_is_read_from_released_file_names(name, code):
    assert language_from_filename(name) == code


def test_a_checkpoint_of_something_else_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, path)
    with pytest.raises(GlueNetFileError, match="model.ckpt is not a GlueNet checkpoint.*blocks.0.net_sen"):
        load_gluenet(path)


def test_a_lavibridge_lora_list_is_refused_and_named(tmp_path):
    path = tmp_path / "lora_text.pt"
    torch.save([torch.zeros(4, 2), torch.zeros(2, 4)], path)
    with pytest.raises(GlueNetFileError, match="holds a list.*LaVi-Bridge"):
        load_gluenet(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_with_code_is_not_executed(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump(Path("/etc/passwd"), f)  # any non-tensor object: weights_only must refuse it
    with pytest.raises(GlueNetFileError, match="could not be read as a safe PyTorch checkpoint"):
        load_gluenet(path)


def test_a_truncated_file_is_reported(small_text_gluenet_ckpt, tmp_path):
    path = tmp_path / "gluenet_French_truncated.ckpt"
    path.write_bytes(small_text_gluenet_ckpt.read_bytes()[:5000])
    with pytest.raises(GlueNetFileError, match="truncated"):
        load_gluenet(path)


def test_wrong_shapes_and_missing_keys_are_listed(small_text_gluenet_state, tmp_path):
    state = dict(small_text_gluenet_state)
    state["blocks.1.net_sen.3.weight"] = torch.zeros(7, 7)
    del state["blocks.0.net_tok.7.bias"]
    path = tmp_path / "gluenet_broken.ckpt"
    torch.save(state, path)
    with pytest.raises(GlueNetFileError, match=r"missing 1 \(e.g. blocks.0.net_tok.7.bias\).*wrong shapes 1"):
        load_gluenet(path)


def test_future_format_versions_ask_for_an_update(small_text_gluenet_state, tmp_path):
    path = tmp_path / "future.safetensors"
    save_file(dict(small_text_gluenet_state), str(path), metadata={"format": "x2i.gluenet", "format_version": "9", "config": "{}"})
    with pytest.raises(GlueNetFileError, match="update the node pack"):
        probe_gluenet_file(path)


def write_metadata_only_gluenet(path: Path, **fields) -> Path:
    """A few hundred bytes: one tiny tensor and metadata describing whatever network ``fields`` say."""
    import json

    config = {"architecture": "translator", "num_tokens": 77, "in_dim": 1024, "out_dim": 768, "depth": 5} | fields
    save_file({"blocks.0.net_tok.0.weight": torch.zeros(1)}, str(path),
              metadata={"format": "x2i.gluenet", "format_version": FORMAT_VERSION, "config": json.dumps(config)})
    return path


def test_metadata_describing_a_huge_network_is_refused_before_anything_is_allocated(tmp_path):
    # At every limit at once: 4096 tokens x 16384 wide, depth 64 would be ~10^11 parameters (400 GB).
    path = write_metadata_only_gluenet(tmp_path / "bomb.safetensors", num_tokens=4096, in_dim=16384, out_dim=16384, depth=64, mult=16,
                                      output_scaling="none")
    assert path.stat().st_size < 1000
    with pytest.raises(GlueNetFileError, match="weights do not fit a translator GlueNet: missing"):
        load_gluenet(path)
    # What the refusal costs: building 64 blocks of modules on the meta device (~120 MiB of Python objects
    # measured), against the hundreds of gigabytes the described network would take.
    cost = cost_of(f"load_gluenet({str(path)!r})", setup="from x2i.gluenet import load_gluenet")
    assert cost["error"].startswith("GlueNetFileError") and cost["peak_mib"] < 500 and cost["seconds"] < 30, cost


@pytest.mark.parametrize(("fields", "message"), [
    ({"depth": 10**9}, "depth must be a whole number from 1 to 64, got 1000000000"),
    ({"in_dim": 16385}, "in_dim must be a whole number from 1 to 16384"),
    ({"num_tokens": "77"}, "num_tokens must be a whole number from 1 to 4096, got '77'"),
    ({"mult": 0}, "mult must be a whole number from 1 to 16, got 0"),
])
def test_configurations_past_the_limits_are_refused(tmp_path, fields, message):
    path = write_metadata_only_gluenet(tmp_path / "odd.safetensors", **fields)
    for read in (load_gluenet, probe_gluenet_file):
        with pytest.raises(GlueNetFileError, match=message):
            read(path)


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(GlueNetFileError, match="not found"):
        load_gluenet(tmp_path / "nope.ckpt")
    odd = tmp_path / "gluenet.onnx"
    odd.write_bytes(b"\0")
    with pytest.raises(GlueNetFileError, match="unsupported GlueNet file type"):
        load_gluenet(odd)


def test_the_pack_command_line_converts_without_comfyui(small_text_gluenet_ckpt, tmp_path):
    import subprocess
    import sys

    from support import REPO_ROOT

    out = tmp_path / "cli.safetensors"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT), "convert-gluenet", str(small_text_gluenet_ckpt), str(out)],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert load_gluenet(out).config.language == "fr"
    unknown = subprocess.run([sys.executable, str(REPO_ROOT), "train-everything"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "commands: convert-gluenet" in unknown.stderr
