"""The GlueNet trainer end to end on text: the official objective to the last digit, learning on a
generated "translation", the command line with interruptions (SIGTERM, SIGKILL) resuming to the same
weights, two gloo processes equal to one, refused resumes, dry runs."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support import REPO_ROOT
from support.models import make_xlm_roberta_folder, reference_tensor_norm_half
from support.training import (
    make_clip_tokenizer,
    parallel_corpus,
    write_config,
    write_parallel_files,
    write_sd1_checkpoint,
)
from x2i.gluenet import GlueNetConfig, load_gluenet
from x2i.training import ConfigError, Distributed, RunSettings, TrainingError, section, train
from x2i.training.checkpoints import checkpoint_files, read_checkpoint
from x2i.training.cli import main as cli_main
from x2i.training.gluenet_objective import GlueNetLossSettings, GlueNetObjective, alignment_metrics, token_weights
from x2i.training.gluenet_task import GlueNetTask
from x2i.training.targets import TargetError

# Tiny models: one intra-op thread is faster than two fighting over a shared CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the official objective, written as the official scripts write it ---------------------------


class OfficialGradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambd):
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * -ctx.lambd, None


class OfficialDiscriminator(nn.Module):
    def __init__(self, dim, dim_out=2, mult=0.25):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(nn.Linear(dim, inner), nn.BatchNorm1d(inner), nn.ReLU(True), nn.Linear(inner, dim_out), nn.LogSoftmax(dim=1))

    def forward(self, x, eta=0.1):
        return self.net(OfficialGradReverse.apply(x, eta))


def official_losses(adapter, adapter_rec, discriminator, clip_raw, source_raw, sound: bool):
    """train_gluenet_multi.py (sound=False) / train_gluenet_sound_text.py (sound=True), one step."""
    tensor_norm = reference_tensor_norm_half() * 2
    loss_domain, loss_mse_wise = nn.NLLLoss(), nn.MSELoss(reduction="none")
    feat_src_ = clip_raw
    feat_src = feat_src_ / (tensor_norm / 2) if sound else feat_src_
    feat_src_over = feat_src_ / (tensor_norm / 2)
    feat_tar = source_raw.reshape(source_raw.shape[0], 16, 1024 // 16) if sound else source_raw / 3
    feat_tar_ad = adapter(feat_tar)
    feat_tar_rec = adapter_rec(feat_tar_ad)
    size_0, size_1, size_2 = feat_src.shape
    pred_s = discriminator(feat_src.reshape(size_0 * size_1, size_2))
    pred_t = discriminator(feat_tar_ad.reshape(size_0 * size_1, size_2))
    feat_src_mean = torch.mean(feat_src_, dim=0)
    feat_src_norm = torch.mean(torch.abs(feat_src_mean - feat_src_mean[-1, :]), dim=1)
    feat_src_norm = feat_src_norm / feat_src_norm.mean()
    feat_src_norm[-1] = (feat_src_norm[-2] + feat_src_norm[-3]) / 2
    feat_src_norm = feat_src_norm.unsqueeze(0).unsqueeze(2)
    labels_s = torch.zeros(size_0 * size_1).long()
    labels_t = torch.ones(size_0 * size_1).long()
    loss_adv = 0.1 * (loss_domain(pred_s, labels_s) + loss_domain(pred_t, labels_t))
    target = feat_src if sound else feat_src_over
    loss_distill = 10000 * (loss_mse_wise(feat_tar_ad, target) * feat_src_norm).mean()
    loss_rec = 10000 * loss_mse_wise(feat_tar_rec, feat_tar).mean()
    return loss_distill, loss_rec, loss_adv


@pytest.mark.parametrize("sound", [False, True], ids=["multilingual", "sound"])
def test_objective_equals_the_official_training_step(sound: bool):
    torch.manual_seed(0)
    if sound:  # Translator_w_head(16, 77, 64, 768, 4, 5) on AudioCLIP's 1024-d embedding; smaller mult for speed
        config = GlueNetConfig("translator_w_head", num_tokens=16, num_tokens_out=77, in_dim=64, out_dim=768, mult=1, depth=3)
        source = F.normalize(torch.randn(4, 1024), dim=-1)
    else:  # Translator_noln(77, 1024, 768) in miniature: 77 tokens, width 48 -> 768
        config = GlueNetConfig("translator_noln", num_tokens=77, in_dim=48, out_dim=768, mult=1, depth=2, input_divisor=3.0)
        source = torch.randn(4, 77, 48) * 2
    clip = torch.randn(4, 77, 768) * 0.7 + torch.linspace(-1, 1, 77)[None, :, None] * 3  # token-dependent means
    objective = GlueNetObjective(config, GlueNetLossSettings(), "audio" if sound else "text")
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # away from the default initialisation
    adapter, adapter_rec = copy.deepcopy(objective.encoder), copy.deepcopy(objective.decoder)
    discriminator = OfficialDiscriminator(768)
    discriminator.load_state_dict(objective.discriminator.state_dict())
    terms = objective({"source": source, "target": clip})
    distill, rec, adv = official_losses(adapter, adapter_rec, discriminator, clip, source, sound)
    torch.testing.assert_close(terms["mse"], distill.detach(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(terms["reconstruction"], rec.detach(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(terms["adversarial"], adv.detach(), rtol=1e-6, atol=1e-6)
    terms["loss"].backward()
    (distill + rec + adv).backward()
    ours = dict(objective.named_parameters())
    theirs = {**{f"encoder.{k}": v for k, v in adapter.named_parameters()},
              **{f"decoder.{k}": v for k, v in adapter_rec.named_parameters()},
              **{f"discriminator.{k}": v for k, v in discriminator.named_parameters()}}
    assert ours.keys() == theirs.keys()
    for name, param in ours.items():  # gradient reversal, token weights and BatchNorm included
        torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(objective.discriminator.net[1].running_var, discriminator.net[1].running_var)


def test_token_weights_and_metrics_on_known_values():
    target = torch.zeros(2, 77, 4)
    target[:, :, 0] = torch.arange(77.0)  # distance to the last token falls linearly: 76, 75, ..., 0
    weights = token_weights(target)
    expected = torch.arange(76.0, -1, -1) / torch.arange(76.0, -1, -1).mean()
    expected[-1] = (expected[-2] + expected[-3]) / 2
    torch.testing.assert_close(weights, expected)
    targets = torch.randn(3, 77, 8)
    metrics = alignment_metrics(targets[[2, 0, 1]], targets, torch.tensor([2, 0, 0]))
    assert metrics["retrieval_top1"] == pytest.approx(2 / 3) and metrics["retrieval_chance"] == pytest.approx(1 / 3)
    assert alignment_metrics(targets, targets, torch.arange(3))["cosine"] == pytest.approx(1.0)


# ---- runs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gluenet_text")
    make_xlm_roberta_folder(root / "xlm-roberta-tiny", hidden=64)
    write_sd1_checkpoint(root / "sd15.safetensors", hidden=32)
    make_clip_tokenizer(root / "sd1_tokenizer")
    write_parallel_files(root / "data", parallel_corpus())
    return root


def text_config(root: Path, output: str, **changes) -> dict:
    raw = {
        "run": {"output_dir": str(root / output), "epochs": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 10,
                "precision": "fp32", "device": "cpu"},
        "data": {"modality": "text", "source_file": str(root / "data" / "captions.fr"),
                 "target_file": str(root / "data" / "captions.en"), "val_fraction": 0.2, "val_max_samples": 36},
        "source": {"encoder": str(root / "xlm-roberta-tiny")},
        "target": {"clip": str(root / "sd15.safetensors"), "tokenizer": str(root / "sd1_tokenizer")},
        "model": {"out_dim": 32, "depth": 1, "language": "fr"},
        "optim": {"lr": 1e-3},
        "cache": {"dir": str(root / "cache"), "dtype": "fp16"},
    }
    for key, value in changes.items():
        section_name, name = key.split(".")
        raw.setdefault(section_name, {})[name] = value
    return raw


def run_in_process(raw: dict):
    return train(GlueNetTask.from_config(raw), section(raw, "run", RunSettings), dist=Distributed())


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(checkpoint_files(output_dir)[-1])
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def metrics(output_dir: Path, split: str) -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_text_gluenet_learns_the_translation_and_exports_a_loadable_file(text_setup: Path):
    raw = text_config(text_setup, "learn", **{"run.epochs": 20, "run.batch_size": 16, "run.log_every": 9,
                                             "run.checkpoint_every": 1000, "model.depth": 2, "optim.lr_step_epochs": 100})
    result = run_in_process(raw)
    train_log, val_log = metrics(text_setup / "learn", "train"), metrics(text_setup / "learn", "val")
    assert train_log[-1]["loss"] < 0.5 * train_log[0]["loss"] and train_log[-1]["mse"] < 0.5 * train_log[0]["mse"]
    # 36 held-out captions never seen in training (unseen animal x colour x place combinations).
    assert val_log[0]["retrieval_chance"] == pytest.approx(1 / 36)
    assert val_log[-1]["retrieval_top1"] >= 0.3 > 3 * val_log[0]["retrieval_top1"] - 0.01
    assert val_log[-1]["cosine"] > val_log[0]["cosine"] and val_log[-1]["mse"] < val_log[0]["mse"]
    (path,) = result.exported
    gluenet = load_gluenet(path)
    config = gluenet.config
    assert (config.architecture, config.num_tokens, config.in_dim, config.out_dim) == ("translator_noln", 77, 64, 32)
    assert (config.input_divisor, config.output_scaling, config.language, config.encoder_hint) == (3.0, "tensor_norm_half", "fr", "xlm-roberta-tiny")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        recorded = json.loads(handle.metadata()["x2i.training"])
    assert recorded["loss"]["mse_weight"] == 1e4 and recorded["optim"]["lr_step_epochs"] == 100


def _cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT), "train", "gluenet", "--config", str(config), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference_run(text_setup: Path) -> Path:
    """The uninterrupted run every interrupted or distributed one must reproduce (2 epochs of 18 steps)."""
    run_in_process(text_config(text_setup, "reference"))
    return text_setup / "reference"


def test_cli_run_stopped_by_sigterm_then_killed_resumes_to_the_uninterrupted_state(text_setup: Path, reference_run: Path):
    from support.training import assert_same_final_state, stop_kill_and_resume

    config = write_config(text_setup / "interrupted.json", text_config(text_setup, "interrupted"))
    output = text_setup / "interrupted"
    # 2 epochs of 18 steps, a checkpoint every 10: the SIGKILLed run resumes from a mid-epoch checkpoint.
    resumed = stop_kill_and_resume("gluenet", config, output, total_steps=36, checkpoint_every=10, exported=["gluenet.safetensors"],
                                   stop_signal=signal.SIGTERM)
    assert resumed["stopped"]["step_in_epoch"] > 0 and resumed["killed"]["step_in_epoch"] > 0
    # Weights, BatchNorm statistics, Adam's moments and step counts, the schedule, the random streams.
    assert_same_final_state(reference_run, output, exported=["gluenet.safetensors"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_build_the_cache_and_train_the_same_gluenet_as_one(text_setup: Path, reference_run: Path):
    # Its own cache, in shards of 50 split over the two ranks.
    raw = text_config(text_setup, "two", **{"cache.dir": str(text_setup / "two" / "cache"), "cache.shard_size": 50})
    config = write_config(text_setup / "two.json", raw)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               *_cli(config)[1:]]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # Two half batches sum in another order than one batch, and Adam turns such rounding differences
    # in near-zero gradients into steps of up to lr: after 36 steps every tensor agrees to ~5e-4 of its
    # largest value (the first step's gradients agree to 1e-6: the test above). The discriminator's first
    # bias is the exception: the BatchNorm right after it removes it, so its true gradient is 0 and what
    # any run computes is rounding noise (measured in the test above), and Adam turns that noise into
    # steps of lr; so is the running mean that tracks it. Neither changes any output.
    noise_only = {"model.discriminator.net.0.bias", "model.discriminator.net.1.running_mean"}
    expected, found = final_weights(reference_run), final_weights(text_setup / "two")
    assert expected.keys() == found.keys()
    for key in expected.keys() - noise_only:
        scale = expected[key].float().abs().max().item()
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=2e-3 * scale + 1e-7, msg=key)
    from safetensors.torch import load_file

    one, two = load_gluenet(reference_run / "gluenet.safetensors"), load_gluenet(text_setup / "two" / "gluenet.safetensors")
    features = load_file(str(text_setup / "cache" / "source-text" / "shard-00000.safetensors"))["features"][:16].float()
    with torch.no_grad():
        reference_out = one.translate(features)
        torch.testing.assert_close(two.translate(features), reference_out, rtol=0, atol=2e-3 * reference_out.abs().max().item())
    shards = sorted((text_setup / "two" / "cache" / "source-text").glob("shard-*.safetensors"))
    assert len(shards) == 4
    reference_cache = load_file(str(text_setup / "cache" / "source-text" / "shard-00000.safetensors"))["features"]
    torch.testing.assert_close(load_file(str(shards[1]))["features"], reference_cache[50:100])


def test_two_gloo_processes_take_the_first_step_with_the_gradients_of_one(text_setup: Path):
    from support.training import assert_same_gradients, first_step_gradients

    raw = text_config(text_setup, "unused", **{"run.batch_size": 16})
    one = first_step_gradients("gluenet", raw, text_setup / "gradients-one", processes=1)
    two = first_step_gradients("gluenet", raw, text_setup / "gradients-two", processes=2)
    discriminator = {k for k in one if k.startswith("discriminator.")}
    # Encoder and decoder: equal to 3e-6 of each tensor's largest gradient (measured: at most 9e-7; a sum
    # instead of a mean would be off by 1, a rank training on the other's half by far more).
    assert_same_gradients({k: v for k, v in one.items() if k not in discriminator},
                          {k: v for k, v in two.items() if k not in discriminator}, tolerance=3e-6)
    # The discriminator sums over 2 x 16 x 77 token rows whose CLIP and GlueNet halves nearly cancel (it cannot
    # tell them apart yet), and one process normalises them with PyTorch's BatchNorm kernel, two with
    # GlobalBatchNorm1d's all-reduced sums: float32 rounding shows at ~1e-4 there. Its measure: the first
    # bias feeds that BatchNorm, which subtracts the batch mean, so its exact gradient is 0, yet it comes out
    # at ~2e-4 of its weight's largest gradient in one process (~4e-6 in two). Both runs must keep it below
    # 1e-3 of that, and every other discriminator tensor must agree to 1e-4.
    bias, weight = "discriminator.net.0.bias", "discriminator.net.0.weight"
    assert_same_gradients({k: one[k] for k in discriminator}, {k: two[k] for k in discriminator}, tolerance=1e-4,
                          zero_by_design={bias: weight}, zero_tolerance=1e-3)


def test_a_resume_with_other_loss_settings_is_refused(text_setup: Path, reference_run: Path):
    raw = text_config(text_setup, "reference", **{"loss.adversarial_weight": 0.5})
    with pytest.raises(ConfigError, match=r"loss\.adversarial_weight: checkpoint 0\.1, now 0\.5"):
        run_in_process(raw)


def test_dry_run_prints_counts_without_encoding(text_setup: Path, capsys):
    data = text_setup / "dry"
    pairs = parallel_corpus()[:20]
    source, target = write_parallel_files(data, pairs)
    source.write_text(source.read_text(encoding="utf-8") + "\nun chat bleu\n", encoding="utf-8")
    target.write_text(target.read_text(encoding="utf-8") + "an empty source line\na blue cat\n", encoding="utf-8")
    raw = text_config(text_setup, "dry", **{"data.source_file": str(source), "data.target_file": str(target),
                                            "cache.dir": str(data / "cache")})
    assert cli_main(["gluenet", "--config", str(write_config(data / "dry.json", raw)), "--dry-run"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["samples"] == 21 and counts["skipped_empty_line"] == 1 and counts["val_samples"] == 4
    assert counts["cache_source"] == "missing" and counts["cache_target"] == "missing"
    assert not (data / "cache").exists() and not (text_setup / "dry").joinpath("checkpoints").exists()


def test_a_target_of_the_wrong_width_is_refused_before_anything_runs(text_setup: Path):
    raw = text_config(text_setup, "wide", **{"model.out_dim": 768, "cache.dir": str(text_setup / "wide-cache")})
    with pytest.raises(TargetError, match="gives 32-wide features but the GlueNet is configured to output 768"):
        run_in_process(raw)
    assert not (text_setup / "wide-cache").exists()


def test_bad_data_is_one_error_line_and_exit_2(text_setup: Path, tmp_path: Path, capsys):
    from support.training import cli_error_line

    short = tmp_path / "captions.en"
    short.write_text("one line only\n", encoding="utf-8")
    raw = text_config(text_setup, "bad-data", **{"data.target_file": str(short), "cache.dir": str(tmp_path / "cache")})

    line = cli_error_line(["gluenet", "--config", str(write_config(tmp_path / "bad.json", raw))], capsys)

    assert line.startswith("error: parallel files are not line-aligned: ") and f"{short} has 1." in line, line
    assert not (tmp_path / "cache").exists()


def test_a_full_disk_while_the_cache_is_built_is_one_error_line_and_exit_2(text_setup: Path):
    from support.training import error_lines, run_cli_on_a_full_disk

    cache = text_setup / "full-disk-cache"
    raw = text_config(text_setup, "full-disk", **{"cache.dir": str(cache)})
    done = run_cli_on_a_full_disk("gluenet", write_config(text_setup / "full-disk.json", raw), limit=64 * 1024)
    (line,) = error_lines(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert line.startswith(f"error: feature cache source-text: cannot write {cache / 'source-text' / 'shard-00000.safetensors'} (")
    assert "free disk space or set cache.dir" in line
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written left behind


def test_a_nan_row_met_while_training_stops_the_run_naming_its_shard(text_setup: Path, reference_run: Path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from x2i.training.cli import error_line

    cache = text_setup / "nan-cache"
    shutil.copytree(text_setup / "cache", cache)  # the reference run's complete caches
    shard = cache / "source-text" / "shard-00000.safetensors"
    with safe_open(str(shard), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k).clone() for k in handle.keys()}
    tensors["features"][:, 5, 7] = float("nan")  # every item, still marked valid: changed after the build
    save_file(tensors, str(shard), metadata=metadata)
    # Read in a loader worker, as with run.num_workers > 0: the error crosses the process boundary.
    raw = text_config(text_setup, "nan-run", **{"cache.dir": str(cache), "run.num_workers": 1})
    with pytest.raises(TrainingError) as caught:
        run_in_process(raw)
    line = error_line(caught.value)  # what the command line prints after "error: "
    assert line.startswith("feature cache source-text: shard shard-00000.safetensors holds NaN or infinite values (row ")
    assert "\n" not in line and "Delete it and run again" in line
    assert not checkpoint_files(text_setup / "nan-run")


def test_a_truncated_shard_is_named_and_encoded_again_by_the_next_run(text_setup: Path, reference_run: Path, caplog):
    import logging
    import shutil

    from safetensors.torch import load_file

    cache = text_setup / "truncated-cache"
    shutil.copytree(text_setup / "cache", cache)
    shard = cache / "target-clip" / "shard-00000.safetensors"
    expected = {k: v.clone() for k, v in load_file(str(shard)).items()}  # not views of the file
    shard.write_bytes(shard.read_bytes()[:-1000])
    task = GlueNetTask.from_config(text_config(text_setup, "truncated", **{"cache.dir": str(cache)}))
    with caplog.at_level(logging.INFO):
        task.prepare(Distributed(), logging.getLogger("x2i.test"))
    assert "feature cache target-clip: broken (shard-00000.safetensors: unreadable or truncated" in caplog.text
    assert "target-clip: shard-00000.safetensors: unreadable or truncated" in caplog.text and "encoding it again" in caplog.text
    assert "feature cache source-text: reused" in caplog.text  # the intact cache is not touched
    assert task.describe()["cache_target"] == "complete"
    rebuilt = load_file(str(shard))
    assert all(torch.equal(rebuilt[k], expected[k]) for k in expected)
