"""U-ViT training (``train uvit``) on tiny models: the objective and optimiser are U-ViT's, the caches hold
what the VAE and CLIP give, a tiny intermediate-fusion U-ViT trained for a few hundred steps on coloured
shapes lowers its loss and draws the shape its caption names under classifier-free guidance, a run stopped
by SIGTERM and resumed ends with the weights of an uninterrupted one, and --dry-run counts without encoding.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import support.bridge_training as bt
from support.training import cli_error_line, make_clip_text_folder, write_config
from x2i.training import ConfigError, Distributed, RunSettings, train
from x2i.training.uvit_task import (
    UViTOptimSettings,
    UViTTask,
    UViTTrainingModel,
    build_uvit_optimizer,
    resolve_uvit_config,
    uvit_alphas_cumprod,
    warmup_lambda,
)
from x2i.uvit import SamplingConvention, UViT, UViTConfig, load_uvit, load_uvit_state_dict, probe_uvit_file
from x2i.weights import save_safetensors_atomic

# Four classes, each a colour and a shape; every other image also has a second caption.
CLASSES = {
    "a red square": ((220, 30, 30), "square"),
    "a blue circle": ((40, 60, 230), "circle"),
    "a green triangle": ((30, 200, 60), "triangle"),
    "a yellow square": ((235, 220, 40), "square"),
}
IMAGES = 96
# A small intermediate-fusion U-ViT on 8x8x4 latents (the tiny VAE downsamples 32 px by 4) and 32-wide CLIP:
# an image-only block on each side, text (cross-attention) in the middle block only.
TINY_MODEL = {"preset": "cross-intermediate", "image_size": 8, "width": 64, "depth": 2, "heads": 2, "n_image": 1, "n_text": 0,
              "context_dim": 32}


# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def write_shapes(folder: Path, count: int, seed: int = 0) -> Path:
    """32 px images of the classes' shapes at random places and sizes, listed in ``pairs.tsv``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        caption = list(CLASSES)[i % len(CLASSES)]
        colour, kind = CLASSES[caption]
        image = Image.new("RGB", (32, 32), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        side = rng.randint(18, 26)
        x, y = rng.randint(0, 32 - side), rng.randint(0, 32 - side)
        if kind == "square":
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=colour)
        elif kind == "circle":
            draw.ellipse([x, y, x + side - 1, y + side - 1], fill=colour)
        else:
            draw.polygon([(x, y + side - 1), (x + side - 1, y + side - 1), (x + side // 2, y)], fill=colour)
        image.save(folder / "images" / f"{i}.png")
        lines.append(f"images/{i}.png\t{caption}")
        if i % 2:
            lines.append(f"images/{i}.png\ta picture of {caption[2:]}")
    (folder / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "pairs.tsv"


def uvit_raw(world: SimpleNamespace, cache: Path, **sections) -> dict:
    raw = {
        "data": {"source": str(world.tsv), "resolution": 32, "validation_count": 16},
        "cache": {"dir": str(cache), "encode_batch_size": 16},
        "model": {**TINY_MODEL, "vae": str(world.vae)},
        "text": {"clip": str(world.clip)},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "ema_decay": 0.95},
        "export": {"name": "shapes", "weights": "both"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def metrics(output: Path, split: str, key: str) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["split"] == split and key in r]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("uvit")
    vae = root / "vae"
    bt.tiny_vae(1).save_pretrained(vae)
    return SimpleNamespace(root=root, tsv=write_shapes(root / "shapes", IMAGES), clip=make_clip_text_folder(root / "clip"), vae=vae)


@pytest.fixture(scope="module")
def caches(world) -> Path:
    """Caches built by the trainer from the tiny VAE and CLIP, then the latents replaced by pooled pixels.

    A random VAE's GroupNorms wash the colours out of its latents, so nothing could learn colours from
    them; pooled RGB (x4, about the spread of SD latents) stands in for a trained VAE's latents, written
    into the same shards with the same keys, so training reads them exactly as it reads real ones."""
    from x2i.training.image_data import image_transform, load_image, scan_pairs

    cache = world.root / "cache"
    task = UViTTask.from_config(uvit_raw(world, cache))
    task.prepare(Distributed(), logging.getLogger("test"))
    images = list(dict.fromkeys(pair.image for pair in scan_pairs(world.tsv)[0]))
    transform = image_transform(32)
    for shard in sorted((cache / "latents").glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
        assert tensors["mean"].shape[1:] == (2, 4, 8, 8) and tensors["mean"].dtype == torch.float16
        pixels = torch.stack([load_image(images[i], transform) for i in json.loads(metadata["kept"])])
        pooled = torch.nn.functional.avg_pool2d(pixels, 4)
        latents = 4 * torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)
        tensors["mean"] = torch.stack([latents, latents.flip(-1)], 1).half()
        tensors["std"] = torch.full_like(tensors["mean"], 0.05)
        save_safetensors_atomic(tensors, shard, metadata)
    return cache


# ---- the objective, optimiser and schedule ------------------------------------------------------------


def tiny_model(p_uncond: float = 0.5, ema_decay: float = 0.9) -> UViTTrainingModel:
    torch.manual_seed(0)
    uvit = UViT(UViTConfig(conditioning="cross", fusion="intermediate", n_image=1, n_text=1, image_size=4, width=32, depth=2,
                           heads=2, context_dim=8, text_tokens=5))
    return UViTTrainingModel(uvit, torch.full((5, 8), 0.5), p_uncond=p_uncond, ema_decay=ema_decay, random_flip=True)


def test_objective_is_uvit_eps_mse_on_the_comfyui_linear_schedule():
    from diffusers import DDPMScheduler

    alphas = uvit_alphas_cumprod()
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()
    assert alphas[0] == 1 and torch.allclose(alphas[1:], reference, rtol=1e-6)  # index n: U-ViT time n, ComfyUI index n - 1

    model = tiny_model()
    seen = {}
    original = model.uvit.forward

    def record(x, t, context):
        seen.update(x=x, t=t, context=context)
        return original(x, t, context)

    model.uvit.forward = record
    g = torch.Generator().manual_seed(5)
    batch = {"latent_mean": torch.randn(6, 2, 4, 4, 4, generator=g), "latent_std": torch.rand(6, 2, 4, 4, 4, generator=g),
             "context": torch.randn(6, 5, 8, generator=g)}
    torch.manual_seed(11)
    loss = model(batch)["loss"]
    # The same draws by hand, in the documented order: flip, posterior sample, n in 1..1000, eps, text drop.
    torch.manual_seed(11)
    flip = (torch.rand(6) < 0.5).long()
    rows = torch.arange(6)
    mean, std = batch["latent_mean"][rows, flip], batch["latent_std"][rows, flip]
    z = (mean + std * torch.randn(mean.shape)) * 0.23010
    n = torch.randint(1, 1001, (6,))
    eps = torch.randn(z.shape)
    drop = torch.rand(6) < 0.5
    x = alphas[n].sqrt().float().view(-1, 1, 1, 1) * z + (1 - alphas[n]).sqrt().float().view(-1, 1, 1, 1) * eps
    assert torch.equal(seen["t"], n) and torch.allclose(seen["x"], x, atol=1e-6)
    assert 0 < int(drop.sum()) < 6
    assert torch.equal(seen["context"][drop], torch.full((int(drop.sum()), 5, 8), 0.5))
    assert torch.equal(seen["context"][~drop], batch["context"][~drop])
    with torch.no_grad():
        expected = (original(x, n, seen["context"]) - eps).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # AdamW with U-ViT's settings over every weight; the EMA follows each optimiser step.
    optimizer = build_uvit_optimizer(model, UViTOptimSettings())
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-4, 0.03, (0.9, 0.9))
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.uvit.parameters())
    assert not any(p.requires_grad for p in model.ema.buffers()) and not list(model.ema.parameters())
    before = {k: v.clone() for k, v in model.ema.state_dict().items()}
    loss.backward()
    optimizer.step()
    weights = dict(model.uvit.named_parameters())
    for name, value in model.ema.state_dict().items():
        assert torch.allclose(value, 0.9 * before[name] + 0.1 * weights[name].detach(), atol=1e-7), name
    schedule = warmup_lambda(5000)
    assert (schedule(0), schedule(2500), schedule(5000), schedule(10**6)) == (0.0, 0.5, 1.0, 1.0)
    assert set(model.state_dict()) == {f"uvit.{k}" for k in weights} | {f"ema.{k}" for k in weights}  # constants stay out


def test_presets_and_fields_resolve_to_the_paper_settings():
    from x2i.training.config import section
    from x2i.training.uvit_task import UViTModelSettings

    def resolved(**values):
        return resolve_uvit_config(section({"model": values}, "model", UViTModelSettings))

    assert resolved().name == "cross-intermediate" and (resolved().n_image, resolved().n_text) == (4, 1)
    assert resolved(preset="concat-early", width=256, heads=4).to_dict() == UViTConfig(width=256, heads=4).to_dict()
    assert (resolved(fusion="early").n_image, resolved(fusion="early").n_text) == (0, 0)  # the preset's [1,4] goes with it
    with pytest.raises(ConfigError, match="unknown preset 'giant'"):
        resolved(preset="giant")
    with pytest.raises(ConfigError, match="width 100 is not divisible by heads 8"):
        resolved(width=100)


# ---- end to end ---------------------------------------------------------------------------------------


@torch.no_grad()
def ddim_cfg(network: UViT, contexts: torch.Tensor, empty: torch.Tensor, scale: float, per_prompt: int, steps: int = 20) -> torch.Tensor:
    """Deterministic DDIM with classifier-free guidance ``uncond + scale * (cond - uncond)`` (ComfyUI's cfg)
    on the U-ViT's schedule; returns the final x0 for every prompt, ``per_prompt`` samples each."""
    alphas = uvit_alphas_cumprod()[1:].float()
    cond = contexts.repeat_interleave(per_prompt, 0)
    uncond = empty.expand_as(cond)
    x = torch.randn(len(cond), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    indices = torch.linspace(999, 0, steps).round().long()
    for k, index in enumerate(indices):
        a = alphas[index]
        a_next = alphas[indices[k + 1]] if k + 1 < steps else torch.tensor(1.0)
        t = torch.full((len(x),), int(index) + 1)  # U-ViT times are ComfyUI's index + 1
        e_cond, e_uncond = network(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
        eps = e_uncond + scale * (e_cond - e_uncond)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def test_the_cache_keys_keep_working_under_their_names_in_data(tmp_path, caplog):
    raw = {
        "data": {"source": str(tmp_path / "pairs.tsv"), "cache_dir": str(tmp_path / "cache"), "cache_batch_size": 4,
                 "cache_shard_size": 8, "text_cache_dtype": "fp32"},
        "model": {**TINY_MODEL, "vae": str(tmp_path / "vae")},
    }
    with caplog.at_level(logging.WARNING, logger="x2i.training"):
        task = UViTTask.from_config(raw)
    cache = task.cache
    assert (cache.dir, cache.encode_batch_size, cache.shard_size, cache.dtype) == (str(tmp_path / "cache"), 4, 8, "fp32")
    assert len(caplog.records) == 4 and "data.cache_dir is an old name: the setting is now cache.dir" in caplog.text


def test_a_tiny_uvit_learns_shapes_and_follows_its_caption_under_cfg(tmp_path, world, caches):
    output = tmp_path / "run"
    task = UViTTask.from_config(uvit_raw(world, caches))
    result = train(task, RunSettings(output_dir=str(output), seed=5, batch_size=32, max_steps=250, log_every=10, validate_every=125,
                                     checkpoint_every=1000, precision="fp32"), resume="never")
    assert result.step == 250 and not result.interrupted
    counts = task.describe()
    assert counts | {"pairs_found": 144, "images": 96, "captions": 6, "train_images": 80, "validation_images": 16,
                     "latent_cache": "complete (96 images)", "text_cache": "complete"} == counts
    assert counts["uvit"] == f"cross-intermediate[0,1], {sum(p.numel() for p in UViT(resolve_uvit_config(task.model_settings)).parameters()):,} parameters"

    # The CLIP cache holds SD1 conditioning: last_hidden_state of 77 end-token-padded tokens, no mask.
    from transformers import CLIPTextModel, CLIPTokenizer

    clip, tokenizer = CLIPTextModel.from_pretrained(world.clip).eval(), CLIPTokenizer.from_pretrained(world.clip)
    table = task.captions
    assert table.captions[-1] == "" and set(table.captions[:-1]) == {*CLASSES, "a picture of blue circle", "a picture of yellow square"}
    ids = tokenizer(table.captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = clip(input_ids=ids).last_hidden_state
    dataset = task.train_dataset()
    stored = torch.stack([dataset.text[i].float() for i in range(len(table))])
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)  # fp16 storage

    loss = metrics(output, "train", "loss")
    val = metrics(output, "val", "val_eps_mse")
    assert len(loss) == 25 and len(val) == 2
    assert sum(loss[-5:]) < 0.3 * sum(loss[:5]), loss
    assert val[-1] < 0.7 * val[0], val
    assert (output / "loss_curve.png").is_file()

    # The EMA (default output) and the raw weights load as the X2IUViTLoader reads them.
    ema_path, raw_path = result.exported
    assert (ema_path.name, raw_path.name) == ("shapes.safetensors", "shapes-raw.safetensors")
    loaded = load_uvit_state_dict(ema_path)
    assert loaded.layout == "x2i" and loaded.config == resolve_uvit_config(task.model_settings) == probe_uvit_file(ema_path)
    assert loaded.sampling == SamplingConvention() and loaded.sampling.latent_scale == pytest.approx(0.23010)
    with safe_open(str(ema_path), "pt") as handle:
        training = json.loads(handle.metadata()["x2i.training"])
    assert training["weights"] == "ema" and training["optim"]["betas"] == [0.9, 0.9] and training["diffusion"]["p_uncond"] == 0.1
    raw = load_uvit_state_dict(raw_path).state_dict
    assert any(not torch.equal(loaded.state_dict[k], raw[k]) for k in raw)

    # Class centres of the training latents (channel means: where the colour is), and samples under CFG 4.
    scale = task.diffusion.latent_scale
    classes = [table.ids[c] for c in CLASSES]
    features = {c: [] for c in classes}
    for i in range(len(dataset)):
        features[dataset.caption_ids[i][0]].append(dataset[i]["latent_mean"][0].float().mean((1, 2)) * scale)
    centres = torch.stack([torch.stack(features[c]).mean(0) for c in classes])
    truth = torch.cat([torch.full((len(features[c]),), k) for k, c in enumerate(classes)])
    data = torch.cat([torch.stack(features[c]) for c in classes])
    assert (torch.cdist(data, centres).argmin(1) == truth).all()  # the classes are separable this way

    network = load_uvit(ema_path)
    contexts = torch.stack([dataset.text[c].float() for c in classes])
    empty = task.empty_context[None]
    per_prompt = 8
    labels = torch.arange(len(classes)).repeat_interleave(per_prompt)
    accuracy = {}
    for guidance in (1.0, 4.0):
        samples = ddim_cfg(network, contexts, empty, guidance, per_prompt)
        predicted = torch.cdist(samples.mean((2, 3)), centres).argmin(1)
        accuracy[guidance] = (predicted == labels).float().mean().item()
    # Chance is 1/4; guidance makes the text matter more.
    assert accuracy[4.0] >= 0.75 and accuracy[4.0] >= accuracy[1.0], accuracy


class StoppedUViTTask(UViTTask):
    """The task with a SIGTERM sent to this process during training forward number ``stop_at``."""

    stop_at = 0

    def build_model(self, dist):
        model = super().build_model(dist)
        calls = [0]

        def hook(module, args):
            calls[0] += 1
            if calls[0] == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

        model.register_forward_pre_hook(hook)
        return model


def test_sigterm_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, world, caches):
    raw = uvit_raw(world, caches, data={"random_flip": True})
    settings = {"seed": 7, "batch_size": 8, "max_steps": 10, "log_every": 1, "validate_every": 5, "checkpoint_every": 4,
                "precision": "fp32"}
    straight = train(UViTTask.from_config(raw), RunSettings(output_dir=str(tmp_path / "straight"), **settings))
    stopped_task = StoppedUViTTask.from_config(raw)
    stopped_task.stop_at = 6
    stopped = train(stopped_task, RunSettings(output_dir=str(tmp_path / "stopped"), **settings))
    assert stopped.interrupted and stopped.step == 6  # 10 batches an epoch: mid-epoch
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir())[-1] == "step-00000006.safetensors"
    assert (tmp_path / "stopped" / "shapes.safetensors").is_file()  # the interrupted run's U-ViT is usable
    resumed = train(UViTTask.from_config(raw), RunSettings(output_dir=str(tmp_path / "stopped"), **settings))
    assert resumed.step == 10 and not resumed.interrupted
    for a, b in zip(straight.exported, resumed.exported, strict=True):
        first, second = load_uvit_state_dict(a).state_dict, load_uvit_state_dict(b).state_dict
        assert all(torch.equal(first[k], second[k]) for k in first), a.name
    assert metrics(tmp_path / "straight", "train", "loss") == metrics(tmp_path / "stopped", "train", "loss")
    assert metrics(tmp_path / "straight", "val", "val_eps_mse_ema") == metrics(tmp_path / "stopped", "val", "val_eps_mse_ema")
    with pytest.raises(ConfigError, match="optim.lr: checkpoint 0.003, now 0.001"):
        train(UViTTask.from_config({**raw, "optim": {**raw["optim"], "lr": 1e-3}}), RunSettings(output_dir=str(tmp_path / "stopped"), **{**settings, "max_steps": 12}))


def test_two_gloo_processes_take_the_first_step_with_the_gradients_of_one(tmp_path, world, caches):
    from support.training import assert_same_gradients, first_step_gradients

    raw = uvit_raw(world, caches, data={"random_flip": True}, diffusion={"p_uncond": 0.5})
    raw["run"] = {"batch_size": 8, "seed": 3}
    one = first_step_gradients("uvit", raw, tmp_path / "one", processes=1)
    two = first_step_gradients("uvit", raw, tmp_path / "two", processes=2)
    # Flip, posterior sample, timestep, noise and text drop: five draws a step, the same per sample in both runs.
    assert int(one["draws_per_step"]) == 5
    # Every U-ViT weight, to 3e-6 of its largest gradient (measured: at most 1.3e-6, the rounding of summing the
    # batch in two halves). The EMA is a buffer, no gradient: the resume test compares it.
    errors = assert_same_gradients(one, two, tolerance=3e-6)
    assert len(errors) == len(list(UViT(resolve_uvit_config(UViTTask.from_config(raw).model_settings)).parameters()))


def test_cli_run_stopped_by_ctrl_c_then_killed_resumes_to_the_uninterrupted_state(tmp_path, world, caches):
    import subprocess

    from support.training import assert_same_final_state, cli_command, cli_env, stop_kill_and_resume

    def config(name: str) -> Path:
        raw = uvit_raw(world, caches, data={"random_flip": True})
        # 80 training images: 10 steps an epoch (a caption drawn per image per epoch), validation at each
        # epoch's end, a checkpoint every 7 steps (mid-epoch).
        raw["run"] = {"output_dir": str(tmp_path / name), "batch_size": 8, "max_steps": 24, "checkpoint_every": 7, "log_every": 1,
                      "validate_every": 0, "seed": 7, "device": "cpu", "precision": "fp32", "num_workers": 0}
        return write_config(tmp_path / f"{name}.json", raw)

    exported = ["shapes.safetensors", "shapes-raw.safetensors"]
    reference = subprocess.Popen(cli_command("uvit", config("straight")), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, env=cli_env())
    resumed = stop_kill_and_resume("uvit", config("interrupted"), tmp_path / "interrupted", total_steps=24, checkpoint_every=7,
                                   exported=exported)
    assert resumed["killed"]["step_in_epoch"] > 0
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    # The U-ViT, its EMA, AdamW's moments and steps, the warm-up schedule, the random streams: all bit for bit.
    assert_same_final_state(tmp_path / "straight", tmp_path / "interrupted", exported=exported)


def test_dry_run_counts_without_encoding_and_bad_settings_exit_2(tmp_path, world, capsys):
    from x2i.training.cli import main

    raw = uvit_raw(world, tmp_path / "cache")
    raw["run"] = {"output_dir": str(tmp_path / "out")}
    config = write_config(tmp_path / "uvit.json", raw)
    assert main(["uvit", "--config", str(config), "--dry-run"]) == 0
    counts = json.loads(capsys.readouterr().out)
    params = sum(p.numel() for p in UViT(resolve_uvit_config(UViTTask.from_config(raw).model_settings)).parameters())
    assert counts == {
        "pairs_found": 144, "pairs_usable": 144, "images": 96, "captions": 6, "train_images": 80, "validation_images": 16,
        "latent_cache": "absent (0 of 1 shards)", "text_cache": "missing", "uvit": f"cross-intermediate[0,1], {params:,} parameters",
    }
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    # The U-ViT's latent side must be what the VAE makes of the images.
    assert main(["uvit", "--config", str(config), "--dry-run", "--set", "data.resolution=64"]) == 2
    assert "gives 16x16 latents, but the U-ViT takes 8x8" in capsys.readouterr().err
    assert main(["uvit", "--config", str(config), "--dry-run", "--set", "model.context_dim=768"]) == 2
    assert "gives 32-wide features but the U-ViT takes 768" in capsys.readouterr().err
    assert main(["uvit", "--config", str(config), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run"]["seed"] == 1234 and printed["run"]["batch_size"] == 256 and printed["optim"]["warmup_steps"] == 20
    assert (printed["model"]["resolved"]["n_image"], printed["model"]["resolved"]["n_text"]) == (1, 0)


def test_bad_data_is_one_error_line_and_exit_2(tmp_path, world, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("missing/0.png\ta red square\nmissing/1.png\ta blue circle\n", encoding="utf-8")
    raw = {**uvit_raw(world, tmp_path / "cache"), "run": {"output_dir": str(tmp_path / "out"), "device": "cpu"}}
    raw["data"]["source"] = str(pairs)

    line = cli_error_line(["uvit", "--config", str(write_config(tmp_path / "bad.json", raw))], capsys)

    assert line == f"error: {pairs} holds no usable image-caption pairs (2 missing image); it should hold lines 'image_path<TAB>caption'"
    assert not (tmp_path / "cache").exists()


def test_two_gloo_processes_train_from_the_shared_caches(tmp_path, world, caches):
    import socket
    import subprocess
    import sys

    from support import REPO_ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    raw = uvit_raw(world, caches, export={"weights": "ema"})
    raw["run"] = {"output_dir": str(tmp_path / "two"), "batch_size": 8, "max_steps": 3, "seed": 3, "device": "cpu", "backend": "gloo",
                  "num_workers": 0, "validate_every": 3, "log_every": 1}
    config = write_config(tmp_path / "two.json", raw)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO_ROOT), "train", "uvit", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "this process encoded" not in done.stderr and '"text_cache": "complete"' in done.stderr  # nothing re-encoded
    assert len(metrics(tmp_path / "two", "train", "loss")) == 3 and len(metrics(tmp_path / "two", "val", "val_eps_mse_ema")) == 1
    trained = load_uvit_state_dict(tmp_path / "two" / "shapes.safetensors")
    assert trained.config == resolve_uvit_config(UViTTask.from_config(raw).model_settings)


def test_an_sdxl_text_encoder_is_refused_before_anything_loads(world, tmp_path):
    raw = uvit_raw(world, tmp_path / "cache")
    raw["text"]["kind"] = "sdxl"
    with pytest.raises(ConfigError, match=r"text.kind = 'sdxl': a U-ViT reads SD1.x's CLIP ViT-L/14 text features"):
        UViTTask.from_config(raw).prepare(Distributed(), logging.getLogger("test"))
