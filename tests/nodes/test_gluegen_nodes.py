"""The GlueGen nodes inside ComfyUI: outputs, validation messages, device policy."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from safetensors.torch import save_file

from support.models import reference_gluegen_text
from support.precision import assert_close_in_half


def _node_ids(pack) -> list[str]:
    extension = asyncio.run(pack.X2IExtension().get_node_list())
    return [node.define_schema().node_id for node in extension]


def test_node_ids_are_the_public_contract(pack):
    assert _node_ids(pack) == [
        "X2ITextEncoderLoader", "X2IGlueNetLoader", "X2IGlueNetRouter", "X2IGlueGenTextEncode",
        "X2IAudioEncoderLoader", "X2IGlueGenAudioEncode",
        "X2IPointCloudLoader", "X2IPointCloudEncoderLoader", "X2IGlueGenPointCloudEncode",
        "X2ITopKFusion",
        "X2ILanguageModelLoader", "X2ILaViBridgeLoader", "X2ILaViBridgeTextEncode",
        "X2IUViTLoader", "X2IBlockConditioning",
    ]


def test_loaders_list_the_installed_files(pack, installed):
    encoder_inputs = pack.X2ITextEncoderLoader.define_schema().inputs
    assert "xlm-roberta-tiny" in encoder_inputs[0].options
    gluenet_inputs = pack.X2IGlueNetLoader.define_schema().inputs
    assert "gluenet_French_clip_overnorm_over3_noln.ckpt" in gluenet_inputs[0].options


def test_hugging_face_folders_live_apart_from_core_loaders_lists(pack, comfy, tiny_xlmr):
    """models/x2i_text_encoders keeps a folder's shards out of core Load CLIP's list, and wins over a folder of the
    same name that was put in models/text_encoders before it existed."""
    folder_paths, models = comfy["folder_paths"], comfy["models"]
    shutil.copytree(tiny_xlmr, models / "x2i_text_encoders" / "xlmr-apart", dirs_exist_ok=True)
    (models / "text_encoders" / "xlmr-apart").mkdir(exist_ok=True)
    (models / "text_encoders" / "xlmr-apart" / "config.json").write_text("{}")  # an older copy, broken

    listed = pack.X2ITextEncoderLoader.define_schema().inputs[0].options
    core = folder_paths.get_filename_list("text_encoders")

    assert "xlmr-apart" in listed
    assert not [name for name in core if name.startswith("xlmr-apart/")]  # the core list never sees its files
    encoder = pack.X2ITextEncoderLoader.execute("xlmr-apart", "fp32").result[0]
    assert encoder.model.hidden_size == 64  # the working copy in x2i_text_encoders, not the broken one


def test_text_encode_node_equals_the_official_math(pack, installed, small_text_gluenet_state, tiny_xlmr):
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_French_clip_overnorm_over3_noln.ckpt", "from file").result[0]
    assert gluenet.language == "fr"
    prompt = "Peinture impressionniste d'un jardin d'après-midi"
    (conditioning,) = pack.X2IGlueGenTextEncode.execute(encoder, gluenet, prompt).result
    from x2i.nodes.common import FAMILY_HOOKS

    assert len(conditioning) == 1 and conditioning[0][1] == {"hooks": FAMILY_HOOKS["sd1"]}  # SD1.x: no pooled vector
    tokens = conditioning[0][0]
    assert tokens.shape == (1, 77, 768) and tokens.dtype == torch.float32 and tokens.device.type == "cpu"
    expected = reference_gluegen_text(tiny_xlmr, small_text_gluenet_state, [prompt])
    if encoder.model.dtype == torch.float32:  # the CPU (and lowvram / novram, where ComfyUI keeps encoders there)
        torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)
    else:  # "auto" on a GPU: ComfyUI's text-encoder precision
        assert_close_in_half(tokens, expected, encoder.model.dtype, "GlueGen conditioning")


def test_cpu_never_runs_the_encoder_in_fp16(pack, comfy):
    from x2i.nodes import common
    cpu = torch.device("cpu")
    assert common.encoder_dtype("auto", cpu) == torch.float32
    assert common.encoder_dtype("fp16", cpu) == torch.float32
    assert common.encoder_dtype("bf16", cpu) == torch.bfloat16


def test_router_node_routes_per_prompt_and_checks_languages(pack, installed, tiny_xlmr, small_text_gluenet_state,
                                                            spanish_text_gluenet_state):
    french = pack.X2IGlueNetLoader.execute("gluenet_French_clip_overnorm_over3_noln.ckpt", "from file").result[0]
    spanish = pack.X2IGlueNetLoader.execute("gluenet_Spanish_clip_overnorm_over3_noln.ckpt", "from file").result[0]
    (router,) = pack.X2IGlueNetRouter.execute("auto", gluenet_1=french, gluenet_2=spanish).result
    assert router.route("Pintura impresionista de un jardín de tarde").target is spanish
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "fp32").result[0]
    # Each prompt reaches its own GlueNet: the numbers are that GlueNet's official recipe, not the other's.
    for text, state, other in (("un perro en la playa al atardecer", spanish_text_gluenet_state, small_text_gluenet_state),
                               ("un chat assis sur un tapis rouge", small_text_gluenet_state, spanish_text_gluenet_state)):
        (conditioning,) = pack.X2IGlueGenTextEncode.execute(encoder, router, text).result
        got = conditioning[0][0]
        assert got.shape == (1, 77, 768)
        torch.testing.assert_close(got, reference_gluegen_text(tiny_xlmr, state, [text]), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(got, reference_gluegen_text(tiny_xlmr, other, [text]), atol=1e-2)
    with pytest.raises(ValueError, match="two GlueNets for 'fr'"):
        pack.X2IGlueNetRouter.execute("auto", gluenet_1=french, gluenet_3=french)
    with pytest.raises(ValueError, match="no GlueNet for 'ja' is connected"):
        pack.X2IGlueNetRouter.execute("ja", gluenet_1=french)
    untagged = pack.X2IGlueNetLoader.execute("gluenet_French_clip_overnorm_over3_noln.ckpt", "from file").result[0]
    untagged = type(untagged)(untagged.patcher, "custom.safetensors", None)
    with pytest.raises(ValueError, match="has no language: set 'language' on its X2I GlueNet Loader"):
        pack.X2IGlueNetRouter.execute("auto", gluenet_1=untagged)


def test_gluenet_loader_validation_messages(pack, installed, small_text_gluenet_state):
    assert pack.X2IGlueNetLoader.validate_inputs(gluenet_name="gluenet_French_clip_overnorm_over3_noln.ckpt", language="from file") is True
    assert "not found" in pack.X2IGlueNetLoader.validate_inputs(gluenet_name="missing.ckpt", language="from file")
    assert "not a readable safetensors" in pack.X2IGlueNetLoader.validate_inputs(gluenet_name="not_a_gluenet.safetensors", language="from file")
    save_file({"some.weight": torch.zeros(2, 2)}, str(installed / "gluenet" / "lora.safetensors"))
    assert "not a GlueNet checkpoint" in pack.X2IGlueNetLoader.validate_inputs(gluenet_name="lora.safetensors", language="from file")


def test_encoder_and_gluenet_mismatch_is_reported_before_encoding(pack, installed, tiny_t5):
    shutil.copytree(tiny_t5, installed / "text_encoders" / "t5-tiny", dirs_exist_ok=True)
    encoder = pack.X2ITextEncoderLoader.execute("t5-tiny", "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_French_clip_overnorm_over3_noln.ckpt", "from file").result[0]
    with pytest.raises(ValueError, match=r"expects 77 tokens x 64 channels, but text encoder 't5-tiny' gives 77 x 48"):
        pack.X2IGlueGenTextEncode.execute(encoder, gluenet, "a cat")


def test_translations_name_real_nodes_inputs_and_outputs(pack):
    import json
    from pathlib import Path

    schemas = {node.define_schema().node_id: node.define_schema() for node in asyncio.run(pack.X2IExtension().get_node_list())}
    locales = sorted((Path(__file__).resolve().parents[2] / "locales").glob("*/nodeDefs.json"))
    assert {p.parent.name for p in locales} >= {"fr", "es", "zh", "ja"}
    for path in locales:
        translated = json.loads(path.read_text(encoding="utf-8"))
        assert set(translated) == set(schemas), (path, set(schemas) ^ set(translated))
        for node_id, entry in translated.items():
            schema = schemas[node_id]
            assert entry["display_name"] and entry["description"], (path, node_id)
            assert set(entry["inputs"]) <= {i.id for i in schema.inputs}, (path, node_id)
            assert {int(k) for k in entry["outputs"]} <= set(range(len(schema.outputs))), (path, node_id)
