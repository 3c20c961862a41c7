"""Sound, point-cloud and fusion nodes inside ComfyUI: batches, official math, clear refusals."""

from __future__ import annotations

import pytest
import torch
import trimesh

from support.models import (
    audioclip_full_checkpoint,
    fake_ulip_checkpoint,
    official_layout,
    random_state_dict,
    reference_tensor_norm_half,
)
from x2i.encoders.audio_input import to_gluegen_waveform
from x2i.gluenet import GlueNet, GlueNetConfig, save_gluenet


@pytest.fixture(scope="module")
def sound_files(comfy):
    models = comfy["models"]
    for name in ("audio_encoders", "point_encoders"):
        (models / name).mkdir(exist_ok=True)
        comfy["folder_paths"].folder_names_and_paths[name] = ([str(models / name)], {".pt", ".ckpt", ".pth", ".safetensors"})
    audioclip_full_checkpoint(models / "audio_encoders" / "AudioCLIP-Full-Training.pt")
    sound_state = random_state_dict(official_layout("Translator_w_head(16,77,64,768,4,5)"), seed=5)
    torch.save(sound_state, models / "gluenet" / "gluenet_sound2img_audioclip_us8k.ckpt")
    return sound_state


def test_audio_batch_gives_one_conditioning_per_clip_with_the_official_math(pack, sound_files):
    encoder = pack.X2IAudioEncoderLoader.execute("AudioCLIP-Full-Training.pt", "fp32").result[0]
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_sound2img_audioclip_us8k.ckpt", "from file").result[0]
    g = torch.Generator().manual_seed(0)
    waveform = torch.randn(2, 1, 48000, generator=g) * 0.2  # two mono clips at 48 kHz, 1 s
    (conditioning,) = pack.X2IGlueGenAudioEncode.execute(encoder, gluenet, {"waveform": waveform, "sample_rate": 48000}).result
    tokens = conditioning[0][0]
    assert tokens.shape == (2, 77, 768)
    # GlueGen: z = AudioCLIP(audio) / |z|, reshaped to [B, 16, 64], GlueNet, x tensor_norm / 2.
    with torch.no_grad():
        clips = to_gluegen_waveform(waveform, 48000)
        z = encoder.model.network(clips.to(encoder.model.network.conv1.weight.device)).cpu()  # where the node ran it
        z = z / z.norm(dim=-1, keepdim=True)
        net = GlueNet(gluenet.patcher.model.config)
        net.load_state_dict(sound_files)
        expected = net(z.reshape(2, 16, 64)) * reference_tensor_norm_half()
    torch.testing.assert_close(tokens, expected, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(tokens[0], tokens[1])


def test_a_text_encoder_on_the_audio_node_is_refused(pack, sound_files, installed):
    text_encoder = pack.X2ITextEncoderLoader.execute("xlm-roberta-tiny", "auto").result[0]
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_sound2img_audioclip_us8k.ckpt", "from file").result[0]
    with pytest.raises(ValueError, match="cannot encode audio: load one with X2I Audio Encoder Loader"):
        pack.X2IGlueGenAudioEncode.execute(text_encoder, gluenet, {"waveform": torch.zeros(1, 1, 100), "sample_rate": 44100})


def test_point_cloud_loader_and_encoder(pack, comfy, sound_files, tmp_path):
    import folder_paths

    checkpoint, _ = fake_ulip_checkpoint("ulip2_colored", seed=3)
    torch.save(checkpoint, comfy["models"] / "point_encoders" / "ulip2.pt")
    folder_paths.set_input_directory(str(tmp_path))
    mesh = trimesh.creation.icosphere(subdivisions=2)
    mesh.export(tmp_path / "ball.obj")
    (tmp_path / "3d").mkdir()
    mesh.export(tmp_path / "3d" / "uploaded.stl")
    (tmp_path / "photo.png").write_bytes(b"")
    assert pack.X2IPointCloudLoader.define_schema().inputs[0].options == ["3d/uploaded.stl", "ball.obj"]
    output = pack.X2IPointCloudLoader.execute("ball.obj", 4096, "y")
    cloud, preview = output.result
    assert cloud.points.shape == (4096, 3) and preview.shape == (1, 512, 512, 3)
    assert output.ui is not None
    encoder = pack.X2IPointCloudEncoderLoader.execute("ulip2.pt", "fp32").result[0]
    assert encoder.model.in_channels == 6  # colour model: the xyz-only ball gets ULIP's grey
    torch.manual_seed(4)
    net = GlueNet(GlueNetConfig("translator_w_head", num_tokens=20, num_tokens_out=77, in_dim=64, out_dim=768, depth=3))
    save_gluenet(net, comfy["models"] / "gluenet" / "gluenet_ulip2.safetensors")
    gluenet = pack.X2IGlueNetLoader.execute("gluenet_ulip2.safetensors", "from file").result[0]
    (conditioning,) = pack.X2IGlueGenPointCloudEncode.execute(encoder, gluenet, cloud).result
    tokens = conditioning[0][0]
    # Reference: ULIP's PointBERT embedding (L2-normalised, the grey colour), as [1, 20, 64] tokens through the
    # GlueNet, x tensor_norm / 2 (the official scaling, typed independently).
    with torch.no_grad():
        embedding = encoder.model.encode_points(cloud.to_tensor().unsqueeze(0), normalize=False).cpu()
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        expected = net.eval()(embedding.reshape(1, 20, 64)) * reference_tensor_norm_half()
    torch.testing.assert_close(tokens, expected, atol=2e-4, rtol=1e-4)
    trimesh.creation.box(extents=(2.0, 0.5, 1.0)).export(tmp_path / "box.obj")
    box = pack.X2IPointCloudLoader.execute("box.obj", 4096, "y").result[0]  # another shape, another conditioning
    (other,) = pack.X2IGlueGenPointCloudEncode.execute(encoder, gluenet, box).result
    assert (other[0][0] - tokens).abs().max() > 1e-3
    assert pack.X2IPointCloudLoader.validate_inputs(file="missing.ply", surface_points=4096, preview_up_axis="y").startswith("point cloud file 'missing.ply' not found")


def test_top_k_fusion_node_keeps_options_and_fuses_each_entry(pack):
    g = torch.Generator().manual_seed(0)
    a = [[torch.randn(1, 77, 768, generator=g), {"area": (8, 8, 0, 0)}], [torch.randn(1, 77, 768, generator=g), {}]]
    b = [[torch.randn(1, 77, 768, generator=g), {}]]
    k = 5
    (fused,) = pack.X2ITopKFusion.execute(a, b, k).result
    assert len(fused) == 2 and fused[0][1] == {"area": (8, 8, 0, 0)} and fused[0][1] is not a[0][1] and fused[1][1] == {}
    for (tokens, _), (a_tokens, _) in zip(fused, a, strict=True):  # every one of the 77 tokens, by value
        x, y = a_tokens[0], b[0][0][0]
        torch.testing.assert_close(tokens[0], torch.cat([x[:k], y[:k], (x[2 * k:] + y[2 * k:]) / 2]), rtol=0, atol=0)
    (whole,) = pack.X2ITopKFusion.execute(a[:1], b, 0).result  # K = 0: the average of all 77
    torch.testing.assert_close(whole[0][0], (a[0][0] + b[0][0]) / 2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="same length and width"):
        pack.X2ITopKFusion.execute([[torch.zeros(1, 154, 8), {}]], b, 4)
