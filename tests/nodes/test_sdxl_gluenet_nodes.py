"""GlueNets for SDXL in the nodes: SDXL CONDITIONING (77 x 2048 tokens, the pooled vector, CLIPTextEncodeSDXL's size
keys) from the text and sound encode nodes, the router and top-K fusion; KSampler runs it on an SDXL U-Net; a
GlueNet for one family meets a model of the other and sampling is refused naming both."""

from __future__ import annotations

import pytest
import torch

from support.comfy_sampling import narrow_model, sample_latent
from x2i.families import SDXL_SIZE_CONDITIONING
from x2i.gluenet import GlueNet, GlueNetConfig, save_gluenet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_XLMR_HIDDEN = 64


def sdxl_gluenet(seed: int, language: str, **changes) -> GlueNet:
    """A text GlueNet for SDXL in this pack's format: 64-wide XLM-R to 77 x 2048 and a 1280-wide pooled vector,
    with measured-looking norms (not CLIP-L's), so the scaling read from the file shows in the numbers."""
    config = GlueNetConfig(
        "translator_noln", num_tokens=77, in_dim=TINY_XLMR_HIDDEN, out_dim=2048, depth=1, input_divisor=3.0,
        language=language, target="sdxl", pooled_dim=1280, output_norm=tuple(20.0 + i / 10 for i in range(77)),
        pooled_norm=4.0, **changes,
    )
    torch.manual_seed(seed)
    return GlueNet(config).eval()


@pytest.fixture(scope="module")
def sdxl_files(comfy, installed):
    gluenets = comfy["models"] / "gluenet"
    files = {"fr": "gluenet_fr_sdxl.safetensors", "es": "gluenet_es_sdxl.safetensors"}
    for seed, (language, name) in enumerate(files.items()):
        save_gluenet(sdxl_gluenet(seed, language), gluenets / name)
    return files


@pytest.fixture(scope="module")
def sdxl_unet(comfy):
    return narrow_model("sdxl")


@pytest.fixture(scope="module")
def sd1_unet(comfy):
    return narrow_model("sd1")


def encode(pack, gluenet_name: str, text: str, language: str = "from file"):
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "fp32").result[0]
    gluenet = pack.X2IGlueNetLoader.execute(gluenet_name, language).result[0]
    return pack.X2IGlueGenTextEncode.execute(encoder, gluenet, text).result[0], encoder, gluenet


def test_text_encode_gives_sdxl_conditioning_equal_to_the_gluenet(pack, sdxl_files):
    from x2i.nodes.common import FAMILY_HOOKS

    prompt = "un chat rouge dans la neige"
    (tokens, options), = encode(pack, sdxl_files["fr"], prompt)[0]
    features = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "fp32").result[0].model.encode([prompt])
    expected_tokens, expected_pooled = sdxl_gluenet(0, "fr").translate_with_pooled(features)
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(options["pooled_output"], expected_pooled, atol=1e-5, rtol=1e-5)
    assert tokens.shape == (1, 77, 2048) and options["pooled_output"].shape == (1, 1280)
    assert {k: options[k] for k in SDXL_SIZE_CONDITIONING} == SDXL_SIZE_CONDITIONING
    assert options["hooks"] is FAMILY_HOOKS["sdxl"]
    # The file's own norms scale the output, not CLIP-L's: GlueNet(x / 3) * norm / 2 on every token.
    gluenet = sdxl_gluenet(0, "fr")
    raw = gluenet(features / 3)
    torch.testing.assert_close(tokens, raw * (torch.tensor(gluenet.config.output_norm)[None, :, None] / 2), atol=1e-5, rtol=1e-5)


def test_sdxl_conditioning_samples_on_an_sdxl_unet_in_one_cfg_batch(pack, sdxl_files, sdxl_unet):
    positive = encode(pack, sdxl_files["fr"], "un chien bleu")[0]
    negative = encode(pack, sdxl_files["fr"], "")[0]
    batches = []
    model = sdxl_unet.clone()

    def record(apply_model, args):
        batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(record)
    latent = sample_latent(model, positive, negative, steps=2, cfg=5.0)
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert batches == [2, 2]  # positive and negative share the family hook group: one batch per step


@pytest.mark.parametrize("gluenet_family, unet_family", [("sd1", "sdxl"), ("sdxl", "sd1")])
def test_a_gluenet_for_one_family_is_refused_on_the_other_naming_both(pack, sdxl_files, sdxl_unet, sd1_unet,
                                                                       gluenet_family, unet_family):
    name = "gluenet_French_clip_overnorm_over3_noln.ckpt" if gluenet_family == "sd1" else sdxl_files["fr"]
    conditioning = encode(pack, name, "un lapin vert")[0]
    unet = {"sd1": sd1_unet, "sdxl": sdxl_unet}[unet_family]
    expected = {("sd1", "sdxl"): r"is for SD1\.x \(768-wide tokens\), but the model is SDXL, an SDXL model \(2048-wide \+ "
                                 r"1280-wide pooled\): use one made for SDXL, or an SD1\.x checkpoint",
                ("sdxl", "sd1"): r"is for SDXL \(2048-wide tokens \+ 1280-wide pooled\), but the model is SD15, an SD1\.x "
                                 r"model \(768-wide\): use one made for SD1\.x, or an SDXL checkpoint"}
    with pytest.raises(ValueError, match=expected[(gluenet_family, unet_family)]):
        sample_latent(unet, conditioning, conditioning, steps=1)


def test_the_router_gives_sdxl_conditioning_and_refuses_mixed_families(pack, sdxl_files):
    french = pack.X2IGlueNetLoader.execute(sdxl_files["fr"], "from file").result[0]
    spanish = pack.X2IGlueNetLoader.execute(sdxl_files["es"], "from file").result[0]
    router = pack.X2IGlueNetRouter.execute("auto", gluenet_1=french, gluenet_2=spanish).result[0]
    encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "fp32").result[0]
    (tokens, options), = pack.X2IGlueGenTextEncode.execute(encoder, router, "el perro come en la casa grande").result[0]
    features = encoder.model.encode(["el perro come en la casa grande"])
    torch.testing.assert_close(options["pooled_output"], sdxl_gluenet(1, "es").translate_with_pooled(features)[1], atol=1e-5, rtol=1e-5)
    spanish_sd1 = pack.X2IGlueNetLoader.execute("gluenet_Spanish_clip_overnorm_over3_noln.ckpt", "from file").result[0]
    with pytest.raises(ValueError, match=r"the GlueNet Router's GlueNets are for different model families: "
                                         r"gluenet_fr_sdxl\.safetensors \(SDXL\), gluenet_Spanish_clip_overnorm_over3_noln\.ckpt "
                                         r"\(SD1\.x\); connect GlueNets made for the model you sample with"):
        pack.X2IGlueNetRouter.execute("auto", gluenet_1=french, gluenet_2=spanish_sd1)


def test_top_k_fusion_of_two_sdxl_conditionings_averages_the_pooled_vectors(pack, sdxl_files):
    a = encode(pack, sdxl_files["fr"], "un chat noir")[0]
    b = encode(pack, sdxl_files["es"], "un perro blanco")[0]
    (tokens, options), = pack.X2ITopKFusion.execute(a, b, 3).result[0]
    torch.testing.assert_close(options["pooled_output"], (a[0][1]["pooled_output"] + b[0][1]["pooled_output"]) / 2)
    torch.testing.assert_close(tokens[:, 3:6], b[0][0][:, :3])
    assert options["hooks"] is a[0][1]["hooks"] and options["width"] == 1024
