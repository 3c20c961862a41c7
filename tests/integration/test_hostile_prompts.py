"""Hostile graphs sent to a real server's /prompt: refused with ComfyUI's 400 and the pack's reason, nothing
of a file's contents in the answer, and the server answers the next request."""

from __future__ import annotations

from support.comfy_server import ComfyServer

SECRET = "TOPSECRET-b41c 1 2 3"


def test_traversal_names_and_numbers_past_their_limits_get_a_400_and_the_server_keeps_serving(
        comfy_server: ComfyServer, tmp_path_factory):
    secret = tmp_path_factory.mktemp("outside") / "secret.xyz"
    secret.write_text(SECRET + "\n")
    for name in (str(secret), "../" * 10 + str(secret).lstrip("/")):
        prompt = {
            "1": {"class_type": "X2IPointCloudLoader", "inputs": {"file": name, "surface_points": 10**10, "preview_up_axis": "y"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
        }
        status, payload = comfy_server.queue(prompt)
        assert status == 400, payload
        errors = str(payload["node_errors"]["1"]["errors"])
        assert "surface_points must be from 512 to 1000000, got 10000000000" in errors
        assert "TOPSECRET" not in str(payload)
        prompt["1"]["inputs"]["surface_points"] = 10000
        status, payload = comfy_server.queue(prompt)
        assert status == 400 and "not found in ComfyUI's input folder" in str(payload["node_errors"]["1"]["errors"]), payload
        assert "TOPSECRET" not in str(payload)
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]
