"""End-to-end bridge training on tiny models: a T5 -> SD1.x bridge learns coloured squares, its two outputs
load through bridge/'s readers with every shape checked, cached latents train the same objective, a
resumed run ends with the same bridge, and the Llama and PixArt recipes train and export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import support.bridge_training as bt
from x2i.bridge import load_adapter, map_lora_pairs, read_lora_pairs, text_lora_targets, unet_lora_targets
from x2i.bridge.language_models import encode_for_bridge, load_language_model
from x2i.bridge.lora import pixart_lora_targets
from x2i.bridge.trained import load_trained_bridge
from x2i.training import ConfigError, Distributed
from x2i.training.bridge_task import BridgeTask

# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return bt.make_sd1_folder(tmp_path_factory.mktemp("sd") / "tiny-sd1")


@pytest.fixture(scope="module")
def squares_tsv(tmp_path_factory) -> Path:
    return bt.write_squares_tsv(tmp_path_factory.mktemp("squares"), 40)


def bridge_config(source: Path, diffusion: Path, language: Path, **sections) -> dict:
    raw = {
        "data": {"source": str(source), "resolution": 32, "validation_count": 8},
        "model": {"diffusion_model": str(diffusion), "language_model": str(language)},
        "optim": {"lr": 1e-3, "text_lr": 1e-4},
        "export": {"name": "squares"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


run, metrics = bt.run_bridge, bt.run_metrics


def test_t5_bridge_learns_and_both_outputs_load(tmp_path, tiny_t5, sd_folder, squares_tsv):
    output = tmp_path / "run"
    task, result = run(bridge_config(squares_tsv, sd_folder, tiny_t5), output, epochs=6, validate_every=8)
    assert result.step == 24 and not result.interrupted
    assert task.describe() | {"train_samples": 32, "validation_samples": 8, "recipe": "t5_unet", "pairs_usable": 40} == task.describe()
    loss = metrics(output, "train", "loss")
    val = metrics(output, "val", "val_eps_mse")
    assert len(loss) == 24 and len(val) == 3
    assert sum(loss[-4:]) < 0.9 * sum(loss[:4]), loss
    assert val[-1] < 0.95 * val[0], val
    assert (output / "loss_curve.png").is_file() and (output / "train.log").is_file()

    # The checkpoint holds what trains (LoRA, adapter) and no frozen weight.
    checkpoint = sorted((output / "checkpoints").glob("step-*.safetensors"))[-1]
    with safe_open(str(checkpoint), "pt") as f:
        stored = [k for k in f.keys() if k.startswith("model.")]
    frozen = [k for k in stored if "lora_" not in k and not k.startswith("model.adapter.")]
    assert frozen == [], frozen  # not even T5's input embedding, a frozen weight tied to shared.weight

    pack, folder = result.exported
    assert pack == output / "squares.safetensors" and folder == output / "squares"
    bridge = load_trained_bridge(pack)
    assert (bridge.recipe.value, bridge.diffusion_model, bridge.rank, bridge.context_dim) == ("t5_unet", "sd1", 32, 32)
    assert bridge.training_config["resolved"] == {
        "recipe": "t5_unet", "diffusion_model": "sd1", "language_model_family": "t5", "vision_lr": 1e-3, "adapter_lr": 1e-3, "text_lr": 1e-4,
    }
    unet_config = json.loads((sd_folder / "unet" / "config.json").read_text())
    lm = load_language_model(tiny_t5, "t5_unet").transformer
    # The released layout, read as a released folder is: every pair checked against its layer.
    vision = map_lora_pairs(read_lora_pairs(folder / "lora_vis.pt"), unet_lora_targets(unet_config), "lora_vis.pt")
    text = map_lora_pairs(read_lora_pairs(folder / "lora_text.pt"), text_lora_targets(lm, "t5"), "lora_text.pt")
    assert list(vision) == list(bridge.vision_lora) and list(text) == list(bridge.text_lora)
    for released, packed in ((vision, bridge.vision_lora), (text, bridge.text_lora)):
        for name, (up, down) in released.items():
            assert torch.equal(up, packed[name][0]) and torch.equal(down, packed[name][1])
            assert up.abs().sum() > 0  # trained: up started at zero
    adapter = load_adapter(folder / "adapter")
    assert adapter.config == bridge.adapter_config and adapter.config.int_dim == (48 + 32) // 2
    assert all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), bridge.adapter.state_dict().values(), strict=True))
    # What the text-encode node computes: the recipe's features through the adapter.
    features, _ = encode_for_bridge(bridge.recipe, lm, load_language_model(tiny_t5, "t5_unet").tokenizer, ["a red square on the left"])
    conditioning = bridge.adapter(features)
    assert conditioning.shape == (1, 77, 32) and torch.isfinite(conditioning).all()


def test_cached_latents_train_the_same_objective(tmp_path, tiny_t5, sd_folder, squares_tsv, caplog):
    losses = []
    for cache in ("", str(tmp_path / "cache")):
        task = BridgeTask.from_config(bridge_config(squares_tsv, sd_folder, tiny_t5, cache={"dir": cache, "encode_batch_size": 5}))
        with caplog.at_level(logging.INFO):
            task.prepare(Distributed(), logging.getLogger("test"))
        torch.manual_seed(0)
        model = task.build_model(Distributed())
        batch = task.collate([task.train_dataset()[i] for i in range(8)])
        torch.manual_seed(1)
        model.train()
        losses.append(model(batch)["loss"].item())
        if cache:
            assert set(batch) == {"latent_mean", "latent_std", "input_ids", "attention_mask"} and model.vae is None
            assert task.describe()["latent_cache"] == "complete (40 samples)"
    # Same draws (flip, posterior sample, t, noise, dropout): only the fp16 storage of the latents differs.
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)


def test_resumed_run_ends_with_the_same_bridge(tmp_path, tiny_t5, sd_folder, squares_tsv):
    raw = bridge_config(squares_tsv, sd_folder, tiny_t5, cache={"dir": str(tmp_path / "cache")})
    _, straight = run(raw, tmp_path / "straight", max_steps=6, validate_every=3)
    _, first = run(raw, tmp_path / "resumed", max_steps=3, validate_every=3)
    assert first.step == 3
    _, second = run(raw, tmp_path / "resumed", max_steps=6, validate_every=3)
    assert second.step == 6
    a, b = load_trained_bridge(straight.exported[0]), load_trained_bridge(second.exported[0])
    for name in a.vision_lora:
        assert torch.equal(a.vision_lora[name][0], b.vision_lora[name][0]), name
    assert all(torch.equal(x, y) for x, y in zip(a.adapter.state_dict().values(), b.adapter.state_dict().values(), strict=True))
    changed = {**raw, "lora": {"rank": 8}}
    with pytest.raises(ConfigError, match="lora.rank: checkpoint 32, now 8"):
        run(changed, tmp_path / "resumed", max_steps=8)


def test_cli_run_stopped_by_ctrl_c_then_killed_resumes_to_the_uninterrupted_state(tmp_path, tiny_t5, sd_folder, squares_tsv):
    from support.training import assert_same_final_state, cli_command, cli_env, stop_kill_and_resume, write_config

    def config(name: str) -> Path:
        # Each run its own latent cache (built the same way), so the reference can run alongside.
        raw = bridge_config(squares_tsv, sd_folder, tiny_t5, cache={"dir": str(tmp_path / name / "cache")}, lora={"rank": 4})
        # 32 training pairs: 4 steps an epoch, validation at each epoch's end, a checkpoint every 5 steps (mid-epoch);
        # LoRA and adapter dropout on: the random streams must resume too.
        raw["run"] = {"output_dir": str(tmp_path / name), "batch_size": 8, "epochs": 4, "checkpoint_every": 5, "log_every": 1,
                      "seed": 3, "device": "cpu", "precision": "fp32", "num_workers": 0}
        return write_config(tmp_path / f"{name}.json", raw)

    import subprocess

    exported = ["squares.safetensors", "squares/lora_vis.pt", "squares/lora_text.pt"]
    reference = subprocess.Popen(cli_command("bridge", config("straight")), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, env=cli_env())
    resumed = stop_kill_and_resume("bridge", config("interrupted"), tmp_path / "interrupted", total_steps=16, checkpoint_every=5,
                                   exported=exported[:1])
    assert resumed["killed"]["step_in_epoch"] > 0
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    # LoRA (vision and text), adapter, AdamW's moments and steps, the random streams: all bit for bit.
    assert_same_final_state(tmp_path / "straight", tmp_path / "interrupted", exported=exported[:1])
    for name in exported[1:]:  # the released layout's lists of LoRA matrices
        a, b = (torch.load(tmp_path / run / name, weights_only=True) for run in ("straight", "interrupted"))
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), name


def test_llama_bridge_trains_and_exports(tmp_path, sd_folder, squares_tsv, tiny_llama):
    llama = tiny_llama
    output = tmp_path / "run"
    raw = bridge_config(squares_tsv, sd_folder, llama, lora={"rank": 4}, export={"released_layout": False},
                        model={"gradient_checkpointing": True})
    task, result = run(raw, output, max_steps=2)
    assert task.describe()["recipe"] == "llama2_unet" and result.exported == [output / "squares.safetensors"]
    bridge = load_trained_bridge(result.exported[0])
    assert (bridge.recipe.value, bridge.language_model_family, bridge.rank, bridge.adapter_config.in_dim) == ("llama2_unet", "llama", 4, 32)
    # Gradients reached every LoRA layer through the checkpointed blocks (up starts at zero).
    assert all(up.any() for up, _ in bridge.vision_pairs() + bridge.text_pairs())
    lm = load_language_model(llama, "llama2_unet", dtype=torch.float32).transformer
    assert list(map_lora_pairs(bridge.text_pairs(), text_lora_targets(lm, "llama"), "text")) == list(bridge.text_lora)


def test_pixart_bridge_trains_with_the_mask_recipe_and_official_lr(tmp_path, tiny_t5, squares_tsv):
    pixart = bt.make_pixart_folder(tmp_path / "pixart")
    output = tmp_path / "run"
    # Frozen weights in bf16 (as for large models) while the LoRA and adapter train in fp32.
    raw = bridge_config(squares_tsv, pixart, tiny_t5, optim={"lr": 0.0}, lora={"text": False},
                        model={"language_model_dtype": "bf16", "diffusion_model_dtype": "bf16"})
    task, result = run(raw, output, max_steps=2)
    assert all(torch.isfinite(torch.tensor(metrics(output, "train", "loss"))))
    bridge = load_trained_bridge(result.exported[0])
    assert (bridge.recipe.value, bridge.diffusion_model, bridge.max_length, bridge.use_attention_mask) == ("t5_transformer", "pixart", 120, True)
    assert {v.dtype for v in bridge.adapter.state_dict().values()} == {torch.float32}
    assert bridge.training_config["resolved"]["vision_lr"] == 2e-5 and bridge.text_lora == {}
    assert list(bridge.vision_lora) == [t.name for t in pixart_lora_targets(2, 16)]
    # Trained without a text LoRA: the released lora_text.pt holds zero pairs (no change to the language model).
    lm = load_language_model(tiny_t5, "t5_transformer").transformer
    zero = map_lora_pairs(read_lora_pairs(result.exported[1] / "lora_text.pt"), text_lora_targets(lm, "t5"), "lora_text.pt")
    assert all(not up.any() for up, _ in zero.values())


def test_the_cache_keys_keep_working_under_their_names_in_data(tmp_path, caplog):
    raw = bridge_config(tmp_path / "pairs.tsv", tmp_path / "sd", tmp_path / "t5",
                        data={"latent_cache": str(tmp_path / "cache"), "cache_batch_size": 5, "cache_shard_size": 7})
    with caplog.at_level(logging.WARNING, logger="x2i.training"):
        task = BridgeTask.from_config(raw)
    assert (task.cache.dir, task.cache.encode_batch_size, task.cache.shard_size) == (str(tmp_path / "cache"), 5, 7)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "data.latent_cache is an old name", "data.cache_batch_size is an old name", "data.cache_shard_size is an old name"]
    assert "the setting is now cache.dir" in caplog.records[0].getMessage()


def test_dry_run_counts_without_loading_models(tmp_path, tiny_t5, sd_folder, squares_tsv, capsys):
    from x2i.training.cli import main

    config = tmp_path / "bridge.toml"
    config.write_text(
        f'[data]\nsource = "{squares_tsv}"\n[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[model]\ndiffusion_model = "{sd_folder}"\nlanguage_model = "{tiny_t5}"\n[run]\noutput_dir = "{tmp_path / "out"}"\n'
    )
    assert main(["bridge", "--config", str(config), "--dry-run"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {
        "pairs_found": 40, "pairs_usable": 40, "recipe": "t5_unet", "diffusion_model": "sd1", "language_model": "t5",
        "latent_cache": "absent (0 of 1 shards)", "train_samples": 32, "validation_samples": 8,
    }
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    assert main(["bridge", "--config", str(config), "--dry-run", "--set", "model.kind=pixart"]) == 2
    assert "model.kind = 'pixart' but tiny-sd1 is a sd1 model" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_share_the_latent_cache_and_train(tmp_path, tiny_t5, sd_folder, squares_tsv):
    import os
    import subprocess
    import sys

    from support import REPO_ROOT
    from x2i.training.image_data import image_transform, load_image, scan_pairs
    from x2i.training.latent_cache import encode_both_flips

    raw = bridge_config(squares_tsv, sd_folder, tiny_t5, cache={"dir": str(tmp_path / "cache"), "shard_size": 16})
    raw["run"] = {"output_dir": str(tmp_path / "two"), "batch_size": 8, "max_steps": 3, "seed": 3, "device": "cpu", "backend": "gloo"}
    config = tmp_path / "two.json"
    config.write_text(json.dumps(raw))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               str(REPO_ROOT), "train", "bridge", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # 40 pairs in shards of 16: rank 0 encodes shards 0 and 2, rank 1 shard 1; rank 0 writes the index.
    assert "this process encoded 2 shard(s)" in done.stderr and "this process encoded 1 shard(s)" in done.stderr
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["index.json", *(f"shard-0000{i}.safetensors" for i in range(3))]
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    vae = AutoencoderKL.from_pretrained(sd_folder / "vae").eval()
    items, _ = scan_pairs(squares_tsv)
    pixels = torch.stack([load_image(item.image, image_transform(32)) for item in items[16:32]])
    mean, _ = encode_both_flips(vae, pixels, torch.device("cpu"))
    torch.testing.assert_close(load_file(str(tmp_path / "cache" / "shard-00001.safetensors"))["mean"], mean, atol=2e-3, rtol=2e-3)
    bridge = load_trained_bridge(tmp_path / "two" / "squares.safetensors")
    assert bridge.recipe.value == "t5_unet" and (tmp_path / "two" / "squares" / "lora_vis.pt").is_file()


def test_two_gloo_processes_take_the_first_step_with_the_gradients_of_one(tmp_path, tiny_t5, sd_folder, squares_tsv):
    from support.training import assert_same_gradients, first_step_gradients

    raw = bridge_config(squares_tsv, sd_folder, tiny_t5, cache={"dir": str(tmp_path / "cache")}, lora={"rank": 4})
    raw["run"] = {"batch_size": 8, "seed": 3}
    one = first_step_gradients("bridge", raw, tmp_path / "one", processes=1)
    two = first_step_gradients("bridge", raw, tmp_path / "two", processes=2)
    # Flip, posterior sample, timestep and noise: four draws a step, the same per sample in both runs.
    assert int(one["draws_per_step"]) == 4
    # Vision LoRA, text LoRA (down and up) and adapter: every trainable tensor, to 3e-6 of its largest gradient
    # (measured: at most 1.3e-6, the rounding of summing the batch in two halves).
    errors = assert_same_gradients(one, two, tolerance=3e-6)
    assert {k.split(".")[0] for k in errors} == {"denoiser", "language_model", "adapter"}
    assert any("lora_A" in k for k in errors) and any("lora_B" in k for k in errors)


def test_bad_data_is_one_error_line_and_exit_2(tmp_path, tiny_t5, sd_folder, capsys):
    from support.training import cli_error_line, write_config

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("missing/0.png\ta red square\nmissing/1.png\ta blue square\n", encoding="utf-8")
    raw = bridge_config(pairs, sd_folder, tiny_t5, cache={"dir": str(tmp_path / "cache")})
    raw["run"] = {"output_dir": str(tmp_path / "out"), "device": "cpu"}

    line = cli_error_line(["bridge", "--config", str(write_config(tmp_path / "bad.json", raw))], capsys)

    assert line == f"error: {pairs} holds no usable image-caption pairs (2 missing image); it should hold lines 'image_path<TAB>caption'"
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_full_disk_while_the_latent_cache_is_built_is_one_error_line_and_exit_2(tmp_path, tiny_t5, sd_folder, squares_tsv):
    from support.training import error_lines, run_cli_on_a_full_disk, write_config

    raw = bridge_config(squares_tsv, sd_folder, tiny_t5, cache={"dir": str(tmp_path / "cache")})
    raw["run"] = {"output_dir": str(tmp_path / "out"), "batch_size": 8, "max_steps": 2, "device": "cpu", "precision": "fp32"}
    # 40 images' latents (80 KB) in one shard: past the limit.
    done = run_cli_on_a_full_disk("bridge", write_config(tmp_path / "full.json", raw), limit=32 * 1024)
    (line,) = error_lines(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert line.startswith(f"error: latent cache: cannot write {tmp_path / 'cache' / 'shard-00000.safetensors'} (")
    assert "free disk space or set cache.dir" in line
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
