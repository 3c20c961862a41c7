"""The server in the memory mode of the device switch, and its memory over many prompts: twenty prompts of
the GlueGen multilingual workflow and twenty of the LaVi-Bridge T5 workflow (a new prompt text and seed
each time, so ComfyUI re-encodes and re-samples instead of answering from its cache) leave the server's
memory where it stood after warm-up: its RSS on the CPU, the VRAM torch holds on a GPU."""

from __future__ import annotations

import copy
import logging

import pytest

from support.comfy_server import ComfyServer, memory_flags, shipped_workflow_prompt

log = logging.getLogger("x2i.tests.memory")

PROMPTS = 20
WARM_UP_PROMPTS = 5  # the first prompts load models, fill caches and grow allocator pools
# CPU: the server's RSS may grow over the last 15 prompts by at most 5% of its RSS after warm-up plus
# 100 MiB. The server holds ~5.9 GB then (an SD1.5 in float32 on the CPU, the encoders, five released-size
# GlueNets of 191 MiB; 7.8 GB for the bridged model, whose LoRA-merged weights sit beside the originals);
# glibc arenas and Python's allocator may drift by tens of MB without any leak (measured on a 2-core x86
# machine: 0-4 MiB over the last 15 prompts of either workflow). Anything kept per prompt of ~30 MB or more
# (a decoded 512-px image batch, a model or a patched weight set reloaded and not freed: a GlueNet is
# 191 MiB) crosses the bound within the 15 prompts. Small per-prompt tensors are the in-process gc scan's
# job (tests/nodes/test_devices.py).
RSS_GROWTH_FRACTION = 0.05
RSS_GROWTH_SLACK = 100 * 1024**2
# GPU: the VRAM torch tensors hold in the server (allocator reserved - free) may grow over the last 15 prompts
# by at most 16 MiB. Models stay loaded between prompts of one workflow, so in use is flat unless something
# is kept: a leaked GlueNet (191 MiB), language model or patched weight copy crosses it at once, anything
# kept per prompt of more than ~1 MiB within the 15 prompts; cuBLAS/cuDNN workspaces settle in warm-up.
VRAM_GROWTH_BOUND = 16 * 1024**2
# Words that vary the positive prompt (French for the GlueGen router, which must keep detecting French).
WORDS = ("rouge", "bleu", "vert", "jaune", "noir", "blanc", "gris", "rose", "violet", "orange",
         "brun", "doré", "argenté", "clair", "sombre", "vif", "pâle", "chaud", "froid", "calme")


def test_server_runs_in_the_mode_the_switch_chose(comfy_server: ComfyServer, pytestconfig: pytest.Config):
    device, vram = pytestconfig.getoption("--device"), pytestconfig.getoption("--comfy-vram")
    stats = comfy_server.get("/system_stats")
    assert stats["devices"][0]["type"] == device
    argv, chosen = set(stats["system"]["argv"]), set(memory_flags(device, vram))
    assert chosen <= argv and not ({"--cpu", "--lowvram", "--novram"} - chosen) & argv, sorted(argv)


def _vary(prompt: dict, index: int) -> dict:
    """The prompt with the positive text and the seed of the ``index``-th repetition."""
    sampler = next(node for node in prompt.values() if node["class_type"] == "KSampler")
    sampler["inputs"]["seed"] = 1000 + index
    positive = prompt[sampler["inputs"]["positive"][0]]
    text = positive["inputs"]["text"]
    positive["inputs"]["text"] = f"{text} {WORDS[index]}"
    return prompt


@pytest.mark.parametrize("workflow", ["gluegen_multilingual.json", "lavibridge_t5_sd15.json"])
def test_twenty_prompts_keep_the_server_memory_flat(workflow, gluegen_models, lavibridge_t5_models,
                                                    comfy_server: ComfyServer, pytestconfig: pytest.Config):
    on_gpu = pytestconfig.getoption("--device") == "cuda"
    measure = comfy_server.torch_vram_in_use if on_gpu else comfy_server.rss_bytes
    shipped = shipped_workflow_prompt(workflow, comfy_server, size=64, steps=1)
    measured = []
    for index in range(PROMPTS):
        prompt = _vary(copy.deepcopy(shipped), index)
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
        assert len(comfy_server.output_files(entry)) == 1
        measured.append(measure())
    baseline, later = measured[WARM_UP_PROMPTS - 1], measured[WARM_UP_PROMPTS:]
    bound = VRAM_GROWTH_BOUND if on_gpu else RSS_GROWTH_FRACTION * baseline + RSS_GROWTH_SLACK
    growth = max(later) - baseline
    what = "torch VRAM in use" if on_gpu else "RSS"
    mib = [round(value / 1024**2) for value in measured]
    log.info("%s: server %s after each prompt (MiB): %s; growth after warm-up %.1f MiB, bound %.0f MiB",
             workflow, what, mib, growth / 1024**2, bound / 1024**2)
    assert growth <= bound, (
        f"{workflow}: server {what} grew by {growth / 1024**2:.0f} MiB after warm-up (bound {bound / 1024**2:.0f} MiB); "
        f"MiB per prompt: {mib}")


# --- steady under load (issue 11): 200 queued prompts of the pack's encoders, and an interruption -----------

LOAD_PROMPTS = 200
LOAD_BATCH = 20  # prompts queued at once; the server's RSS is read after each batch has run


def _encode_graphs(index: int, sounds: list[str]) -> dict:
    """One prompt holding the three encoders, each ending in core PreviewAny (no sampling: what is measured
    is the pack's loaders and encoders): GlueGen text, GlueGen sound, LaVi-Bridge text. Both prompt texts
    change every time; the sound every fifth time (AudioCLIP's 4 s forward dominates a CPU run). The
    loaders stay the same, so ComfyUI keeps their models and only the encoders run again, as in a session
    of a user editing prompts."""
    word = WORDS[index % len(WORDS)]
    return {
        "1": {"class_type": "X2ITextEncoderLoader", "inputs": {"encoder_name": "xlm-roberta-large", "dtype": "auto"}},
        "2": {"class_type": "X2IGlueNetLoader", "inputs": {"gluenet_name": "gluenet_French_clip_overnorm_over3_noln.ckpt", "language": "from file"}},
        "3": {"class_type": "X2IGlueGenTextEncode", "inputs": {"encoder": ["1", 0], "gluenet": ["2", 0], "text": f"un chat {word} n°{index}"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "11": {"class_type": "LoadAudio", "inputs": {"audio": sounds[(index // 5) % len(sounds)]}},
        "12": {"class_type": "X2IAudioEncoderLoader", "inputs": {"encoder_name": "AudioCLIP-Full-Training.pt", "dtype": "auto"}},
        "13": {"class_type": "X2IGlueNetLoader", "inputs": {"gluenet_name": "gluenet_sound2img_audioclip_us8k.ckpt", "language": "from file"}},
        "14": {"class_type": "X2IGlueGenAudioEncode", "inputs": {"encoder": ["12", 0], "gluenet": ["13", 0], "audio": ["11", 0]}},
        "15": {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}},
        "21": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "22": {"class_type": "X2ILanguageModelLoader", "inputs": {"model_name": "t5-large", "dtype": "auto"}},
        "23": {"class_type": "X2ILaViBridgeLoader", "inputs": {"model": ["21", 0], "language_model": ["22", 0], "bridge_name": "t5_unet",
                                                              "unet_strength": 1.0, "text_strength": 1.0}},
        "24": {"class_type": "X2ILaViBridgeTextEncode", "inputs": {"bridge": ["23", 1], "text": f"a {word} cat, #{index}", "quality_suffix": False}},
        "25": {"class_type": "PreviewAny", "inputs": {"source": ["24", 0]}},
    }


def test_two_hundred_queued_prompts_of_every_encoder_keep_the_server_memory_flat(
        gluegen_models, multimodal_models, varied_sounds, lavibridge_t5_models, comfy_server: ComfyServer,
        pytestconfig: pytest.Config):
    on_gpu = pytestconfig.getoption("--device") == "cuda"
    measure = comfy_server.torch_vram_in_use if on_gpu else comfy_server.rss_bytes
    measured = []
    for first in range(0, LOAD_PROMPTS, LOAD_BATCH):
        ids = []
        for index in range(first, first + LOAD_BATCH):
            status, payload = comfy_server.queue(_encode_graphs(index, varied_sounds))
            assert status == 200, payload
            ids.append(payload["prompt_id"])
        for prompt_id in ids:
            entry = comfy_server.wait(prompt_id)
            assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
        measured.append(measure())
    baseline, later = measured[0], measured[1:]  # the first batch loads every model once
    bound = VRAM_GROWTH_BOUND if on_gpu else RSS_GROWTH_FRACTION * baseline + RSS_GROWTH_SLACK
    mib = [round(value / 1024**2) for value in measured]
    log.info("200 prompts: server memory after each batch of %d (MiB): %s", LOAD_BATCH, mib)
    assert max(later) - baseline <= bound, f"server memory grew by {(max(later) - baseline) / 1024**2:.0f} MiB: {mib}"


def test_an_interrupted_prompt_leaves_the_server_serving_the_next_one(gluegen_models, comfy_server: ComfyServer):
    import time

    long_run = shipped_workflow_prompt("gluegen_multilingual.json", comfy_server, size=64, steps=200)
    status, payload = comfy_server.queue(_vary(long_run, 3))
    assert status == 200, payload
    deadline = time.monotonic() + 300
    while not comfy_server.get("/queue")["queue_running"]:  # wait until it is executing
        assert time.monotonic() < deadline, "the long prompt never started"
        time.sleep(0.2)
    time.sleep(2.0)  # inside the encoders or the sampler's steps
    comfy_server._request("POST", "/interrupt", {})
    entry = comfy_server.wait(payload["prompt_id"])
    assert entry["status"]["status_str"] == "error"
    assert any(event == "execution_interrupted" for event, _ in entry["status"]["messages"]), entry["status"]["messages"]
    follow_up = comfy_server.run(_vary(shipped_workflow_prompt("gluegen_multilingual.json", comfy_server, size=64, steps=1), 4))
    assert follow_up["status"]["status_str"] == "success" and len(comfy_server.output_files(follow_up)) == 1
