"""``train gluenet --set target.kind=sdxl``: a GlueNet learns SDXL's conditioning (77 x 2048 tokens from CLIP-L and
OpenCLIP bigG at their real widths, and bigG's pooled vector) from a tiny XLM-R, beats chance on held-out retrieval,
measures the targets' norms, and exports a file whose translation is the trained network's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support.models import make_xlm_roberta_folder
from support.training import make_clip_tokenizer, parallel_corpus, write_parallel_files, write_sdxl_checkpoint
from x2i.gluenet import load_gluenet
from x2i.gluenet.scaling import per_token_norm
from x2i.training import Distributed, RunSettings, section, train
from x2i.training.checkpoints import checkpoint_files, read_checkpoint
from x2i.training.gluenet_objective import GlueNetLossSettings, GlueNetObjective
from x2i.training.gluenet_task import NORM_SAMPLES, GlueNetTask
from x2i.training.targets import pack_target, unpack_target

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gluenet_sdxl")
    make_xlm_roberta_folder(root / "xlm-roberta-tiny", hidden=64)
    write_sdxl_checkpoint(root / "sdxl.safetensors", layers=2)  # the penultimate layer SDXL reads is then a transformer layer's output
    make_clip_tokenizer(root / "sd1_tokenizer")
    write_parallel_files(root / "data", parallel_corpus())
    return root


def sdxl_config(root: Path, output: str, **run) -> dict:
    return {
        "run": {"output_dir": str(root / output), "epochs": 20, "batch_size": 16, "log_every": 27, "checkpoint_every": 1000,
                "precision": "fp32", "device": "cpu", **run},
        "data": {"modality": "text", "source_file": str(root / "data" / "captions.fr"),
                 "target_file": str(root / "data" / "captions.en"), "val_fraction": 0.2, "val_max_samples": 36},
        "source": {"encoder": str(root / "xlm-roberta-tiny")},
        "target": {"kind": "sdxl", "clip": str(root / "sdxl.safetensors"), "tokenizer": str(root / "sd1_tokenizer")},
        "model": {"depth": 2, "language": "fr"},
        # The reconstruction decoder of a 2048-wide output runs its mixer at 2048 (~100 M parameters): the
        # SD1.x tests cover it; here it would make the run minutes long on a CPU.
        "loss": {"reconstruction": False},
        "optim": {"lr": 2e-3, "lr_step_epochs": 100},
        "cache": {"dir": str(root / "cache"), "dtype": "fp32"},
    }


def test_an_sdxl_gluenet_learns_tokens_and_pooled_vector_and_exports_them(sdxl_setup: Path):
    import json

    raw = sdxl_config(sdxl_setup, "learn")
    task = GlueNetTask.from_config(raw)
    result = train(task, section(raw, "run", RunSettings), dist=Distributed())
    lines = [json.loads(line) for line in (sdxl_setup / "learn" / "metrics.jsonl").read_text().splitlines()]
    train_log, val_log = [r for r in lines if r["split"] == "train"], [r for r in lines if r["split"] == "val"]
    assert train_log[-1]["pooled"] < 0.5 * train_log[0]["pooled"] and train_log[-1]["mse"] < 0.5 * train_log[0]["mse"]
    # 36 held-out captions (unseen animal x colour x place combinations) among 36 distinct SDXL targets.
    assert val_log[0]["retrieval_chance"] == pytest.approx(1 / 36)
    assert val_log[-1]["retrieval_top1"] >= 0.25 > 3 * val_log[0]["retrieval_top1"] - 0.01
    assert val_log[-1]["pooled_cosine"] > val_log[0]["pooled_cosine"] + 0.1
    assert val_log[-1]["pooled_mse"] < val_log[0]["pooled_mse"]

    (path,) = result.exported
    gluenet = load_gluenet(path)
    config = gluenet.config
    assert (config.target, config.out_dim, config.pooled_dim, config.tokens_out) == ("sdxl", 2048, 1280, 77)
    # The norms are GlueGen's tensor_norm measured on the SDXL training targets (at most NORM_SAMPLES of them).
    ids = sorted({t for i in task.train_indices for t in task.listing.samples[i][1]})[:NORM_SAMPLES]
    tokens, pooled = unpack_target(task.targets.gather(ids).float(), 1280)
    assert config.output_norm == pytest.approx(per_token_norm(tokens), rel=1e-6)
    assert config.pooled_norm == pytest.approx(float(pooled.norm(dim=-1).mean()), rel=1e-6)
    assert config.output_norm[0] != pytest.approx(config.output_norm[5])  # the start token differs: not one constant

    # The exported file translates exactly as the trained network in the last checkpoint does.
    trained = GlueNetObjective(config, GlueNetLossSettings(reconstruction=False))
    tensors, _ = read_checkpoint(checkpoint_files(sdxl_setup / "learn")[-1])
    trained.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    features = torch.randn(3, 77, 64)
    for mine, theirs in zip(gluenet.translate_with_pooled(features), trained.encoder.eval().translate_with_pooled(features), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_the_pooled_term_is_the_token_mse_form_on_the_scaled_pooled_target(sdxl_setup: Path):
    from x2i.gluenet import GlueNetConfig

    config = GlueNetConfig("translator_noln", num_tokens=77, in_dim=8, out_dim=2048, depth=1, target="sdxl", pooled_dim=1280,
                           output_norm=tuple(float(20 + i) for i in range(77)), pooled_norm=3.0, input_divisor=3.0)
    torch.manual_seed(0)
    settings = GlueNetLossSettings(reconstruction=False, adversarial=False, pooled_weight=7.0)
    objective = GlueNetObjective(config, settings)
    source, tokens, pooled = torch.randn(2, 77, 8), torch.randn(2, 77, 2048) * 20, torch.randn(2, 1280)
    terms = objective({"source": source, "target": pack_target(tokens, pooled)})
    y = objective.encoder(source / 3)
    expected_pooled = 7.0 * ((objective.encoder.pooled_head(y) - pooled / 3.0) ** 2).mean()
    torch.testing.assert_close(terms["pooled"], expected_pooled.detach())
    torch.testing.assert_close(terms["loss"], (terms["mse"] + terms["pooled"]).detach())
    # The pooled term trains the head only: the GlueNet's gradient is the token MSE's alone.
    terms["loss"].backward()
    tokens_only = GlueNetObjective(config, GlueNetLossSettings(reconstruction=False, adversarial=False, pooled_weight=0.0))
    tokens_only.load_state_dict(objective.state_dict())
    tokens_only({"source": source, "target": pack_target(tokens, pooled)})["loss"].backward()
    for mine, reference in zip(objective.encoder.blocks.parameters(), tokens_only.encoder.blocks.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, reference.grad)
    assert objective.encoder.pooled_head.mlp[0].weight.grad.abs().sum() > 0


def run_steps(raw: dict, output: Path, max_steps: int):
    raw = {**raw, "run": {**raw["run"], "output_dir": str(output), "max_steps": max_steps, "checkpoint_every": 3, "log_every": 3}}
    return train(GlueNetTask.from_config(raw), section(raw, "run", RunSettings), dist=Distributed())


def test_a_resumed_sdxl_run_equals_the_uninterrupted_one_in_every_tensor(sdxl_setup: Path):
    from support.training import assert_same_final_state

    # The adversarial term's BatchNorm and Adam's moments too; the norms are measured again by the resumed run.
    raw = sdxl_config(sdxl_setup, "unused")
    run_steps(raw, sdxl_setup / "straight", 6)
    assert run_steps(raw, sdxl_setup / "resumed", 3).step == 3
    assert run_steps(raw, sdxl_setup / "resumed", 6).step == 6
    assert_same_final_state(sdxl_setup / "straight", sdxl_setup / "resumed", exported=["gluenet.safetensors"])


def test_two_gloo_processes_take_the_first_sdxl_step_with_the_gradients_of_one(sdxl_setup: Path):
    from support.training import assert_same_gradients, first_step_gradients

    raw = sdxl_config(sdxl_setup, "unused")
    raw["run"] = {"batch_size": 16, "seed": 3}
    one = first_step_gradients("gluenet", raw, sdxl_setup / "gradients-one", processes=1)
    two = first_step_gradients("gluenet", raw, sdxl_setup / "gradients-two", processes=2)
    discriminator = {k for k in one if k.startswith("discriminator.")}
    # The GlueNet and its pooled head to 3e-6 of each tensor's largest gradient. The head's score bias shifts every
    # token's score alike, which softmax ignores: its gradient is 0 up to rounding. The discriminator as for SD1.x
    # (tests/training/test_gluenet.py: its BatchNorm's rounding).
    score_bias = {"encoder.pooled_head.score.bias": "encoder.pooled_head.score.weight"}
    assert_same_gradients({k: v for k, v in one.items() if k not in discriminator},
                          {k: v for k, v in two.items() if k not in discriminator}, tolerance=3e-6,
                          zero_by_design=score_bias, zero_tolerance=1e-3)
    assert_same_gradients({k: one[k] for k in discriminator}, {k: two[k] for k in discriminator}, tolerance=1e-4,
                          zero_by_design={"discriminator.net.0.bias": "discriminator.net.0.weight"}, zero_tolerance=1e-3)
