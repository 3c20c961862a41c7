"""`train bridge` on an SDXL base: SDXL single files (SGM layout) converted by diffusers against a config read from
their shapes, wrong files named, diffusers SDXL folders; the micro-conditioning each sample carries (original
size and crop, recorded in the latent cache); a T5 -> tiny SDXL bridge that learns and exports the adapter with
its pooled head and the LoRA it trained; exact resume; two gloo processes stepping as one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import support.bridge_training as bt
from x2i.bridge import load_bridge, map_lora_pairs, text_lora_targets
from x2i.bridge.language_models import load_language_model
from x2i.bridge.lora import UNetStructure, unet_lora_targets
from x2i.training import Distributed
from x2i.training.bridge_model import lora_pairs
from x2i.training.bridge_settings import BridgeOptimSettings, resolved_learning_rates
from x2i.training.bridge_task import BridgeTask
from x2i.training.diffusion_models import (
    SDXL_UNET_CONFIG,
    DiffusionModelError,
    load_diffusion_model,
    sdxl_unet_config_from_shapes,
)
from x2i.training.image_data import crop_geometry, image_transform

# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")

UNET_CLASSES = {"ResnetBlock2D", "Attention", "GEGLU"}
TINY_VAE = {"vae_config": bt.TINY_SDXL_VAE_CONFIG}
# Image sizes (width, height) the squares are stretched to: crops from the top, the left and none.
SIZES = [(32, 32), (48, 32), (32, 44), (64, 40), (37, 50)]


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    return bt.make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sized_squares(tmp_path_factory) -> Path:
    """40 coloured squares stretched to the sizes of SIZES in turn: the micro-conditioning differs per image."""
    from PIL import Image

    tsv = bt.write_squares_tsv(tmp_path_factory.mktemp("squares"), 40)
    for i, path in enumerate(sorted((tsv.parent / "images").iterdir(), key=lambda p: int(p.stem.split("_")[1]))):
        with Image.open(path) as image:
            stretched = image.resize(SIZES[i % len(SIZES)], Image.BILINEAR)
        stretched.save(path)
    return tsv


def bridge_config(source: Path, diffusion: Path, language: Path, **sections) -> dict:
    raw = {
        "data": {"source": str(source), "resolution": 32, "validation_count": 8},
        # A 64-wide adapter middle: the tiny T5 is 48 wide, the default (48 + 2048) / 2 would make the adapter the
        # largest network of the test.
        "model": {"diffusion_model": str(diffusion), "language_model": str(language), "adapter_int_dim": 64},
        "optim": {"lr": 1e-3, "text_lr": 1e-4},
        "export": {"name": "squares"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


class KeepingBridgeTask(BridgeTask):
    """The bridge task, keeping the trained model it exports (to compare the exported file with it)."""

    def export(self, model, output_dir):
        self.trained = model
        return super().export(model, output_dir)


def run(raw: dict, output: Path, **settings) -> tuple[KeepingBridgeTask, object]:
    return bt.run_bridge(raw, output, KeepingBridgeTask, **settings)


metrics = bt.run_metrics


# ---- micro-conditioning: the crop the transform makes -------------------------------------------------


def test_crop_geometry_is_the_crop_the_transform_makes():
    from torchvision.transforms import functional as TF

    g = torch.Generator().manual_seed(0)
    for width, height in [(32, 32), (48, 32), (32, 44), (37, 50), (101, 64), (640, 427)]:
        image = TF.to_pil_image(torch.rand(3, height, width, generator=g))
        geometry = crop_geometry(width, height, 32)
        assert (geometry.original_height, geometry.original_width) == (height, width)
        # The resized image cropped at the recorded corner is exactly what the training transform gives.
        resized = TF.resize(image, 32, interpolation=TF.InterpolationMode.BILINEAR)
        cropped = TF.normalize(TF.to_tensor(TF.crop(resized, geometry.crop_top, geometry.crop_left, 32, 32)), [0.5], [0.5])
        assert torch.equal(cropped, image_transform(32)(image)), (width, height)
        assert min(geometry.crop_top, geometry.crop_left) == 0  # the shorter side is not cropped
    # diffusers' train_text_to_image_sdxl.py: (original h, w) + (crop top, left) + (target h, w).
    assert crop_geometry(640, 427, 32).time_ids(32).tolist() == [427, 640, 0, 8, 32, 32]
    assert crop_geometry(37, 50, 32).time_ids(32).tolist() == [50, 37, 6, 0, 32, 32]  # 43 high: round(5.5) = 6


# ---- SDXL single files and folders ----------------------------------------------------------------------


def test_sdxl_single_file_is_converted_by_diffusers_to_the_model_it_was_written_from(tmp_path):
    path, unet, vae = bt.write_sdxl_single_file(tmp_path / "tiny-sdxl.safetensors")
    model = load_diffusion_model(path, dtype=torch.bfloat16, **TINY_VAE)
    assert (model.kind, model.context_dim, model.pooled_dim, model.scaling_factor) == ("sdxl", 2048, 1280, 0.13025)
    # The config read from the file's shapes is the one the file was written from, per-level depths included.
    config = {k: v for k, v in model.denoiser.config.items() if not k.startswith("_")}
    assert config == {k: v for k, v in unet.config.items() if not k.startswith("_")}
    assert same_state(model.denoiser, unet.to(torch.bfloat16)) and same_state(model.vae, vae)
    # The U-Net in the dtype asked for, the VAE in float32 (SDXL's overflows in fp16: force_upcast).
    assert {p.dtype for p in model.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in [*model.denoiser.parameters(), *model.vae.parameters()])
    schedule = model.scheduler.config  # SDXL base's schedule: SD1's numbers
    assert (schedule.beta_schedule, schedule.beta_start, schedule.beta_end, schedule.num_train_timesteps,
            schedule.prediction_type) == ("scaled_linear", 0.00085, 0.012, 1000, "epsilon")
    # LaVi-Bridge's rule on the SDXL U-Net: every Linear / Conv2d under ResnetBlock2D, Attention, GEGLU.
    targets = model.lora_targets()
    assert [t.name for t in targets] == bt.official_order(unet, UNET_CLASSES)
    assert targets == unet_lora_targets(UNetStructure.from_config(dict(unet.config)))
    # Depth 2 (second blocks: 9 layers each) in level 2's one down and two up attentions and in the middle block.
    assert sum(".transformer_blocks.1." in t.name for t in targets) == 9 * 4


def test_sdxl_configs_are_read_back_from_the_shapes_at_full_size():
    """SDXL base's layout (meta tensors: no memory) gives back exactly SDXL base's config, and diffusers converts
    it to the shapes of the model; a smaller SDXL-family U-Net (fewer transformer blocks per level) gives its own."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for config in (SDXL_UNET_CONFIG, {**SDXL_UNET_CONFIG, "transformer_layers_per_block": [1, 1, 2]}):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        ldm = bt.ldm_unet_state(unet)
        assert ldm["label_emb.0.0.weight"].shape == (1280, 2816) and ldm["input_blocks.4.1.proj_in.weight"].dim() == 2
        assert sdxl_unet_config_from_shapes(ldm) == config
        converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, config)
        assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet.state_dict().items()}
        assert [t.name for t in unet_lora_targets(UNetStructure.from_config(config))] == bt.official_order(unet, UNET_CLASSES)


def test_sdxl_unets_diffusers_cannot_build_as_one_config_are_refused():
    ldm = bt.ldm_unet_state(bt.tiny_sdxl_unet())
    shallow_middle = {k: v for k, v in ldm.items() if not k.startswith("middle_block.1.transformer_blocks.1.")}
    with pytest.raises(DiffusionModelError, match="its middle block has 1 transformer blocks and its last level 2"):
        sdxl_unet_config_from_shapes(shallow_middle, "vega-like")
    irregular_up = {k: v for k, v in ldm.items() if not k.startswith("output_blocks.1.1.transformer_blocks.1.")}
    with pytest.raises(DiffusionModelError, match=r"up blocks' transformer depths are \[\[2, 1\], \[1, 1\], \[0, 0\]\].*SSD-1B"):
        sdxl_unet_config_from_shapes(irregular_up, "ssd-like")
    bad_adm = {**ldm, "label_emb.0.0.weight": torch.zeros(128, 1290)}
    with pytest.raises(DiffusionModelError, match="ADM input .* is 1290 wide"):
        sdxl_unet_config_from_shapes(bad_adm)


@pytest.mark.parametrize(
    ("build", "kind", "message"),
    [
        ("refiner", "auto", "is an SDXL refiner \\(text context 1280 wide, ADM input 2560.*bridge the SDXL base"),
        ("sd1", "sdxl", "is an SD1.x checkpoint \\(text context 768 wide, no pooled-text and size embedding.*model.kind = \"sd1\""),
        ("sd2", "sdxl", "is an SD2.x checkpoint \\(text context 1024 wide"),
        ("sdxl", "sd1", "is an SDXL checkpoint, not SD1.x: train it with model.kind = \"sdxl\""),
        ("vae", "sdxl", "has no U-Net \\(model.diffusion_model.\\* keys\\): it is a standalone VAE.*the SDXL checkpoint"),
        ("refiner_folder", "auto", "is an SDXL refiner.*bridge the SDXL base"),
        ("sdxl_folder", "sd1", "looks like a sdxl model, but model.kind says sd1"),
    ],
)
def test_wrong_models_for_sdxl_are_named(tmp_path, build, kind, message):
    path = tmp_path / "model.safetensors"
    refiner = {"cross_attention_dim": 1280, "projection_class_embeddings_input_dim": 2560, "addition_time_embed_dim": 256}
    if build == "refiner":
        bt.write_sdxl_single_file(path, **refiner)
    elif build in ("sd1", "sd2"):
        unet = bt.tiny_unet(cross_attention_dim=768 if build == "sd1" else 1024)
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bt.ldm_unet_state(unet).items()}, str(path))
    elif build == "sdxl":
        bt.write_sdxl_single_file(path)
    elif build == "vae":
        save_file({f"first_stage_model.{k}": v.contiguous() for k, v in bt.ldm_vae_state(bt.tiny_vae()).items()}, str(path))
    else:
        path = bt.make_sdxl_folder(tmp_path / "folder", **(refiner if build == "refiner_folder" else {}))
    with pytest.raises(DiffusionModelError, match=message):
        load_diffusion_model(path, kind, **TINY_VAE)


def test_sdxl_diffusers_folder(sdxl_folder):
    model = load_diffusion_model(sdxl_folder, dtype=torch.bfloat16)
    assert (model.kind, model.context_dim, model.pooled_dim, model.scaling_factor) == ("sdxl", 2048, 1280, 0.13025)
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}
    assert [t.name for t in model.lora_targets()] == bt.official_order(model.denoiser, UNET_CLASSES)
    # SDXL's U-Net reads the pooled vector and the six size numbers: without them there is no prediction.
    noisy, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 2048)
    time_ids = torch.tensor([[32.0, 48, 0, 8, 32, 32], [44, 32, 6, 0, 32, 32]])
    with torch.no_grad():
        eps = model.predict_noise(noisy.bfloat16(), t, context.bfloat16(), pooled=torch.randn(2, 1280).bfloat16(), time_ids=time_ids)
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()
    with pytest.raises(DiffusionModelError, match="needs the pooled text vector and the time_ids"):
        model.predict_noise(noisy, t, context)
    assert resolved_learning_rates(BridgeOptimSettings(), "sdxl") == (1e-4, 1e-4, 5e-6)


def test_dry_run_of_an_sdxl_single_file_and_the_wrong_kind_named(tmp_path, tiny_t5, sized_squares, capsys):
    from x2i.training.cli import main

    path, _, _ = bt.write_sdxl_single_file(tmp_path / "tiny-sdxl.safetensors")
    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[data]\nsource = "{sized_squares}"\n[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[model]\ndiffusion_model = "{path}"\nlanguage_model = "{tiny_t5}"\n[run]\noutput_dir = "{tmp_path / "out"}"\n'
    )
    assert main(["bridge", "--config", str(config), "--dry-run"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert (counts["diffusion_model"], counts["recipe"], counts["latent_cache"]) == ("sdxl", "t5_unet", "absent (0 of 1 shards)")
    assert main(["bridge", "--config", str(config), "--dry-run", "--set", "model.kind=sd1"]) == 2
    assert 'tiny-sdxl.safetensors is an SDXL checkpoint, not SD1.x: train it with model.kind = "sdxl"' in capsys.readouterr().err


# ---- training -------------------------------------------------------------------------------------------


def test_cached_and_decoded_samples_carry_their_size_and_train_the_same_objective(tmp_path, tiny_t5, sdxl_folder, sized_squares, caplog):
    from safetensors import safe_open

    losses, time_ids = [], []
    for cache in ("", str(tmp_path / "cache")):
        task = BridgeTask.from_config(bridge_config(sized_squares, sdxl_folder, tiny_t5, cache={"dir": cache, "encode_batch_size": 5}))
        with caplog.at_level(logging.INFO):
            task.prepare(Distributed(), logging.getLogger("test"))
        torch.manual_seed(0)
        model = task.build_model(Distributed())
        assert model.adapter.config.pooled_dim == 1280 and model.adapter.config.out_dim == 2048
        batch = task.collate([task.train_dataset()[i] for i in range(8)])
        torch.manual_seed(1)
        model.train()
        losses.append(model(batch)["loss"].item())
        time_ids.append(batch["time_ids"])
        if cache:
            assert set(batch) == {"latent_mean", "latent_std", "input_ids", "attention_mask", "time_ids"} and model.vae is None
            with safe_open(str(Path(cache) / "shard-00000.safetensors"), "pt") as f:
                assert f.metadata()["format"] == "x2i.bridge-latents/2" and f.get_slice("geometry").get_shape() == [40, 4]
    # Each sample's (original h, w, crop top, left, target h, w), read from the cache as decoded.
    assert torch.equal(time_ids[0], time_ids[1])
    first = [SIZES[i % len(SIZES)] for i in task.train_dataset().indices[:8]]
    expected = [crop_geometry(w, h, 32).time_ids(32).tolist() for w, h in first]
    assert time_ids[1].tolist() == expected and len({tuple(row) for row in expected}) > 3
    # Same draws (flip, posterior sample, t, noise, dropout): only the fp16 storage of the latents differs.
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)


def test_t5_sdxl_bridge_learns_and_exports_the_networks_it_trained(tmp_path, tiny_t5, sdxl_folder, sized_squares):
    output = tmp_path / "run"
    raw = bridge_config(sized_squares, sdxl_folder, tiny_t5, cache={"dir": str(tmp_path / "cache")})
    task, result = run(raw, output, epochs=6, validate_every=8)
    assert result.step == 24 and task.describe()["diffusion_model"] == "sdxl"
    loss, val = metrics(output, "train", "loss"), metrics(output, "val", "val_eps_mse")
    # Measured (tiny T5 -> tiny SDXL U-Net, 32 squares of five sizes, batch 8, lr 1e-3): held-out ε-MSE
    # 1.064 -> 0.917 -> 0.745 at steps 8, 16, 24 (0.70 of the first); training loss 4.49 summed over the first four
    # steps, 3.19 over the last four (0.71). The bars leave room for other BLAS builds.
    assert len(val) == 3 and val[-1] < 0.85 * val[0], val
    assert sum(loss[-4:]) < 0.85 * sum(loss[:4]), loss
    assert result.exported == [output / "squares.safetensors"]  # no released layout: it has no pooled head

    bridge = load_bridge(result.exported[0])
    trained = task.trained
    assert bridge.trained_for == "sdxl" and bridge.recipe.value == "t5_unet"
    assert bridge.adapter.config == trained.adapter.config == type(trained.adapter.config)(48, 64, 2048, pooled_dim=1280)
    # The adapter with its pooled head, exactly (stored in float32); the pooled head trained from its start.
    assert same_state(bridge.adapter, trained.adapter)
    assert any(k.startswith("pooled_head.") for k in bridge.adapter.state_dict())
    # The LoRA pairs, in the official order, as trained (stored in fp16 as the release).
    vision_targets = unet_lora_targets(json.loads((sdxl_folder / "unet" / "config.json").read_text()))
    text_targets = text_lora_targets(load_language_model(tiny_t5, "t5_unet").transformer, "t5")
    for pairs, module, targets in ((bridge.vision_pairs, trained.denoiser, vision_targets),
                                   (bridge.text_pairs, trained.language_model, text_targets)):
        expected = lora_pairs(module, targets)
        assert list(map_lora_pairs(pairs, targets, "test")) == list(expected)
        for (up, down), (trained_up, trained_down) in zip(pairs, expected.values(), strict=True):
            assert torch.equal(up, trained_up.half()) and torch.equal(down, trained_down.half())
        assert all(up.any() for up, _ in pairs)  # trained: up started at zero


def test_sdxl_resumed_run_equals_the_uninterrupted_one_in_every_tensor(tmp_path, tiny_t5, sdxl_folder, sized_squares):
    from support.training import assert_same_final_state

    # LoRA and adapter dropout on: the random streams must resume too. One cache for both runs.
    raw = bridge_config(sized_squares, sdxl_folder, tiny_t5, cache={"dir": str(tmp_path / "cache")}, lora={"rank": 4})
    run(raw, tmp_path / "straight", max_steps=6, validate_every=3)
    _, first = run(raw, tmp_path / "resumed", max_steps=3, validate_every=3)
    assert first.step == 3
    _, second = run(raw, tmp_path / "resumed", max_steps=6, validate_every=3)
    assert second.step == 6
    # LoRA (vision and text), adapter with its pooled head, AdamW's moments and steps, the random streams.
    assert_same_final_state(tmp_path / "straight", tmp_path / "resumed", exported=["squares.safetensors"])


def test_two_gloo_processes_take_the_first_sdxl_step_with_the_gradients_of_one(tmp_path, tiny_t5, sdxl_folder, sized_squares):
    from support.training import assert_same_gradients, first_step_gradients

    raw = bridge_config(sized_squares, sdxl_folder, tiny_t5, cache={"dir": str(tmp_path / "cache")}, lora={"rank": 4})
    raw["run"] = {"batch_size": 8, "seed": 3}
    one = first_step_gradients("bridge", raw, tmp_path / "one", processes=1)
    two = first_step_gradients("bridge", raw, tmp_path / "two", processes=2)
    # Flip, posterior sample, timestep and noise: four draws a step, the same per sample in both runs.
    assert int(one["draws_per_step"]) == 4
    # Every trainable tensor, the pooled head's too, to 3e-6 of its largest gradient (measured: at most 1.3e-6, the
    # rounding of summing the batch in two halves). The pooled head's score bias shifts every token's score alike, which
    # softmax ignores: its gradient is 0 up to rounding (measured 2.7e-11, 2.2e-7 of the score weight's).
    errors = assert_same_gradients(one, two, tolerance=3e-6, zero_tolerance=1e-6,
                                   zero_by_design={"adapter.pooled_head.score.bias": "adapter.pooled_head.score.weight"})
    assert {k.split(".")[0] for k in errors} == {"denoiser", "language_model", "adapter"}
    assert any(k.startswith("adapter.pooled_head.") for k in errors)
