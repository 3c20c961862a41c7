"""The shared training loop: outputs a user watches, exact resume after SIGTERM or a crash, refusal
of a disagreeing resume, a full disk that never corrupts a checkpoint, and DDP over gloo equal to
one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from support.toy_task import ToySettings, ToyTask
from x2i.training import ConfigError, Distributed, RunSettings, TrainingError, load_config, section, train
from x2i.training.checkpoints import checkpoint_files, read_checkpoint

HERE = Path(__file__).resolve().parent


def run_settings(out: Path, **changes) -> RunSettings:
    values = dict(output_dir=str(out), seed=3, epochs=4, batch_size=8, checkpoint_every=4, log_every=2, precision="fp32")
    return RunSettings(**{**values, **changes})


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "toy.safetensors")


def test_a_run_learns_and_leaves_what_a_user_watches(tmp_path: Path):
    result = train(ToyTask(ToySettings()), run_settings(tmp_path, keep_checkpoints=2))
    assert (result.step, result.epoch, result.interrupted) == (48, 4, False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    val = [(r["epoch"], r["mse"]) for r in records if r["split"] == "val"]
    assert [epoch for epoch, _ in val] == [1, 2, 3, 4]
    assert sorted((mse for _, mse in val), reverse=True) == [mse for _, mse in val] and val[-1][1] < 0.05
    assert sum(train_losses[-4:]) < 0.5 * sum(train_losses[:4])
    assert result.metrics["mse"] == val[-1][1]
    assert (tmp_path / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "checkpoint step-00000048" in (tmp_path / "train.log").read_text()
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-00000044.safetensors", "step-00000048.safetensors"]
    tensors, header = read_checkpoint(checkpoint_files(tmp_path)[-1])
    # Frozen weights never go into checkpoints; trainable ones, buffers, optimiser and RNG do.
    assert "model.frozen.weight" not in tensors and "model.linear.weight" in tensors and "model.seen" in tensors
    assert int(tensors["model.seen"]) == 48 * 8
    assert header["position"] == {"step": 48, "epoch": 4, "step_in_epoch": 0}


def test_sigterm_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(tmp_path: Path):
    train(ToyTask(ToySettings()), run_settings(tmp_path / "straight"))
    stopped = train(ToyTask(ToySettings(signal_at=17)), run_settings(tmp_path / "stopped"))
    assert stopped.interrupted and stopped.step == 17  # 12 steps per epoch: mid-epoch 2
    assert checkpoint_files(tmp_path / "stopped")[-1].name == "step-00000017.safetensors"
    assert (tmp_path / "stopped" / "toy.safetensors").exists()  # the interrupted run's adapter is usable
    resumed = train(ToyTask(ToySettings()), run_settings(tmp_path / "stopped"))
    assert resumed.step == 48 and not resumed.interrupted
    straight, again = final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_a_crash_resumes_from_the_last_periodic_checkpoint_to_the_same_weights(tmp_path: Path):
    train(ToyTask(ToySettings()), run_settings(tmp_path / "straight"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(ToyTask(ToySettings(crash_at=23)), run_settings(tmp_path / "crashed"))
    assert checkpoint_files(tmp_path / "crashed")[-1].name == "step-00000020.safetensors"
    train(ToyTask(ToySettings()), run_settings(tmp_path / "crashed"))
    straight, again = final_weights(tmp_path / "straight"), final_weights(tmp_path / "crashed")
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_ctrl_c_twice_stops_at_once_keeping_the_last_checkpoint_and_the_run_resumes(tmp_path: Path):
    """The loop's promise: a second Ctrl+C interrupts at once, and the last checkpoint stays intact. Through the
    command line (the toy registered as a kind); the model presses Ctrl+C twice during step 18 itself, so the
    second press lands while the loop still trains, as a user's would."""
    from support.training import assert_same_final_state, write_config

    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import support; from x2i.training import cli; "
            "cli.TASKS['toy'] = ('support.toy_task', 'ToyTask'); sys.exit(cli.main(sys.argv[2:]))")
    run = {"output_dir": str(tmp_path / "run"), "seed": 3, "epochs": 4, "batch_size": 8, "checkpoint_every": 4, "log_every": 2,
           "precision": "fp32", "device": "cpu"}

    def command(name: str, **toy) -> list[str]:
        config = write_config(tmp_path / f"{name}.json", {"run": run, "toy": toy})
        return [sys.executable, "-c", code, str(HERE.parent), "toy", "--config", str(config)]

    aborted = subprocess.run(command("twice", signal_at=18, signal_name="SIGINT", signal_count=2), capture_output=True, text=True,
                             timeout=120)
    # Killed by its SIGINT, as Python ends on an unhandled KeyboardInterrupt (a shell shows 130): no exit(130)
    # of a finished stop, no checkpoint of step 18, no export.
    assert aborted.returncode == -signal.SIGINT, aborted.stderr[-3000:]
    assert "SIGINT received: saving a checkpoint" in aborted.stderr and "\nKeyboardInterrupt\n" in aborted.stderr
    assert "interrupted at step" not in aborted.stdout
    assert [p.name for p in checkpoint_files(tmp_path / "run")] == ["step-00000012.safetensors", "step-00000016.safetensors"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000012.safetensors", "step-00000016.safetensors"]
    _, header = read_checkpoint(checkpoint_files(tmp_path / "run")[-1])  # intact
    assert header["position"] == {"step": 16, "epoch": 1, "step_in_epoch": 4}
    assert not (tmp_path / "run" / "toy.safetensors").exists()
    # The same command (without the presses) resumes from step 16 to the state of an uninterrupted run.
    resumed = subprocess.run(command("again"), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr and "at step 16" in resumed.stderr, resumed.stderr[-3000:]
    train(ToyTask(ToySettings()), run_settings(tmp_path / "straight", device="cpu"))
    assert_same_final_state(tmp_path / "straight", tmp_path / "run", exported=["toy.safetensors"])


def test_a_resume_with_other_settings_is_refused_and_names_them(tmp_path: Path):
    train(ToyTask(ToySettings(signal_at=5)), run_settings(tmp_path))
    with pytest.raises(ConfigError, match=r"toy\.lr: checkpoint 0\.1, now 0\.01.*run\.batch_size: checkpoint 8, now 16"):
        train(ToyTask(ToySettings(lr=0.01)), run_settings(tmp_path, batch_size=16))
    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(ToyTask(ToySettings()), run_settings(tmp_path), resume="never")
    # Longer training and another checkpoint cadence are fine.
    assert train(ToyTask(ToySettings()), run_settings(tmp_path, epochs=5, checkpoint_every=7)).step == 60


def test_a_full_disk_keeps_the_last_checkpoint_intact(tmp_path: Path):
    # The child lowers its own file-size limit mid-run, so the next checkpoint write fails like a full disk.
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/..']; from support.toy_task import ToySettings, ToyTask; "
        "from test_runtime import run_settings; from x2i.training import train; from pathlib import Path; "
        "train(ToyTask(ToySettings(file_limit_at=6)), run_settings(Path(sys.argv[2])))"
    )
    child = subprocess.run([sys.executable, "-c", code, str(HERE), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert child.returncode != 0
    assert "could not write checkpoint" in child.stderr and "the last good checkpoint is step-00000004.safetensors" in child.stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004.safetensors"]  # no partial file left
    read_checkpoint(tmp_path / "checkpoints" / "step-00000004.safetensors")
    assert train(ToyTask(ToySettings()), run_settings(tmp_path)).step == 48


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Plain SGD: Adam divides each step by the gradient's own size, so it would train the same weights from
# gradients twice too large (a sum over processes instead of a mean); SGD's steps are the gradients.
DDP_TOY = ToySettings(dropout=0.0, optimizer="sgd", lr=0.02)


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(ToyTask(DDP_TOY), run_settings(Path(out), device="cpu"))


def test_two_gloo_processes_train_the_same_weights_as_one(tmp_path: Path):
    train(ToyTask(DDP_TOY), run_settings(tmp_path / "one"), dist=Distributed())
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, start_method="spawn")
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for key in one:
        # 48 steps of rounding from summing each batch in two halves: measured below 1e-7.
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-7)
    _, header = read_checkpoint(checkpoint_files(tmp_path / "two")[-1])
    assert len(header["rng"]) == 2  # each rank's random state is kept


def test_config_files_and_overrides(tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\noutput_dir = "out"\nbatch_size = 16\n[toy]\nlr = 0.1\n')
    raw = load_config(path, ["run.epochs=7", "toy.dropout=0", "run.output_dir=/data/runs/a b"])
    assert section(raw, "run", RunSettings) == RunSettings(output_dir="/data/runs/a b", batch_size=16, epochs=7)
    assert section(raw, "toy", ToySettings).dropout == 0.0
    with pytest.raises(ConfigError, match=r"\[toy\] has unknown setting\(s\) learning_rate; valid settings: crash_at, dropout"):
        section(load_config(None, ["toy.learning_rate=1"]), "toy", ToySettings)
    with pytest.raises(ConfigError, match=r"\[run\] batch_size = 'big' is not a valid int"):
        section(load_config(None, ["run.output_dir=o", "run.batch_size=big"]), "run", RunSettings)
    with pytest.raises(ConfigError, match=r"\[run\] precision = 'fp8' is not a valid choice \('auto' \| 'bf16' \| 'fp32'\)"):
        section(load_config(None, ["run.output_dir=o", "run.precision=fp8"]), "run", RunSettings)
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["batch_size=3"])
    with pytest.raises(ConfigError, match=r"\[run\] batch_size must be at least 1"):
        section(load_config(None, ["run.output_dir=o", "run.batch_size=0"]), "run", RunSettings)


def test_too_little_data_for_one_batch_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TrainingError, match="has 96 samples, fewer than one batch of run.batch_size = 128"):
        train(ToyTask(ToySettings()), run_settings(tmp_path, batch_size=128))


def test_the_cli_applies_a_kinds_own_run_defaults_under_the_users_values():
    def resolved(*overrides: str) -> dict:
        args = [sys.executable, str(HERE.parents[1]), "train", "gluenet", "--print-config", "--set", "run.output_dir=out",
                "--set", "source.encoder=enc", "--set", "target.clip=clip.safetensors"]
        for override in overrides:
            args += ["--set", override]
        child = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
        return json.loads(child.stdout)["run"]

    # GlueGen's official recipes: text 4 epochs of batch 32, sound 10 epochs of batch 8.
    assert (resolved()["epochs"], resolved()["batch_size"]) == (4, 32)
    sound = resolved("data.modality=audio", "data.audio_dir=sounds")
    assert (sound["epochs"], sound["batch_size"]) == (10, 8)
    assert resolved("data.modality=audio", "data.audio_dir=sounds", "run.batch_size=64")["batch_size"] == 64
    child = subprocess.run([sys.executable, str(HERE.parents[1]), "train", "gluenet", "--set", "run.output_dir=o", "--set", "modle.depth=3"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 2 and "unknown section(s) [modle]" in child.stderr


@pytest.mark.parametrize(("artefact", "what"), [
    ("metrics.jsonl", "the metrics log"), ("loss_curve.png", "the loss curve"), ("toy.safetensors", "exporting the trained toy"),
])
def test_an_artefact_that_cannot_be_written_is_the_runs_own_error_naming_it(tmp_path: Path, artefact: str, what: str):
    # A folder where the file must go: every write of it fails, as on a full disk, also for root.
    (tmp_path / artefact).mkdir(parents=True)
    (tmp_path / artefact / "keep").write_text("x")
    with pytest.raises(TrainingError, match=rf"^{what}: cannot write .*{artefact}.*; .*run the same command again"):
        train(ToyTask(ToySettings()), run_settings(tmp_path, epochs=1))
    assert not [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no temp file left behind
    if artefact != "metrics.jsonl":  # the first log line comes before the first checkpoint
        read_checkpoint(checkpoint_files(tmp_path)[-1])  # written before the failure, intact


class _RenamedToyTask(ToyTask):
    """The toy task after a release renamed its key ``toy.rate`` to ``toy.lr``."""

    RENAMED = {"toy.rate": "toy.lr"}


class _BeforeTheRename(ToyTask):
    """The toy task as a release before the rename saved its config in checkpoints."""

    def config(self) -> dict:
        values = super().config()
        values["toy"]["rate"] = values["toy"].pop("lr")
        return values


def test_a_renamed_key_keeps_working_under_its_old_name_and_old_checkpoints_resume(tmp_path: Path, caplog):
    with caplog.at_level("WARNING", logger="x2i.training"):
        task = _RenamedToyTask.from_config({"toy": {"rate": 0.05}})
    assert task.settings.lr == 0.05
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["toy.rate is an old name: the setting is now toy.lr; rename it in your config"]
    with pytest.raises(ConfigError, match="toy.rate is the old name of toy.lr and both are set; keep only toy.lr"):
        _RenamedToyTask.from_config({"toy": {"rate": 0.05, "lr": 0.1}})

    stopped = train(_BeforeTheRename(ToySettings(signal_at=5)), run_settings(tmp_path))
    assert stopped.interrupted
    assert train(_RenamedToyTask(ToySettings()), run_settings(tmp_path)).step == 48  # the old checkpoint's config matches

