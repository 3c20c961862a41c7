"""Start a headless ComfyUI server in a subprocess and talk to its HTTP API.

Kept free of pytest so it can also be used from a plain script while debugging.
Only the standard library is used: the test process never imports ``comfy``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("x2i.tests.comfy")

# Model folders the server gets from the test models dir (names are ComfyUI folder keys).
MODEL_FOLDERS = (
    "checkpoints", "text_encoders", "gluenet", "vae", "loras", "diffusion_models", "audio_encoders",
    "point_encoders", "lavi_bridge",
)
# The folder the test server finds the pack in (custom_nodes/<PACK_NAME>), as a git clone names it.
PACK_NAME = "ComfyUI-X2I"
STARTUP_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.25
POLL_TIMEOUT_S = 60.0  # one /history request; wait() keeps polling until its own deadline
LOG_TAIL_CHARS = 6000


class ComfyServerError(RuntimeError):
    """The server refused a request or failed; the message carries the server log tail."""


def free_port() -> int:
    """A port that was free a moment ago (small race accepted: tests run serially)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_extra_model_paths(path: Path, custom_nodes_root: Path, models_dir: Path) -> None:
    """YAML in ComfyUI's extra_model_paths format: one section, folders relative to base_path."""
    lines = ["x2i_tests:", f"  base_path: {json.dumps(str(models_dir))}",
             f"  custom_nodes: {json.dumps(str(custom_nodes_root))}"]
    lines += [f"  {folder}: {folder}" for folder in MODEL_FOLDERS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<no server log: {exc}>"
    return text[-chars:]


@dataclass
class ComfyServer:
    """A running ComfyUI server plus a small synchronous API client."""

    url: str
    log_path: Path
    output_dir: Path
    models_dir: Path
    input_dir: Path
    process: subprocess.Popen[bytes] | None = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    # ------------------------------------------------------------ HTTP

    def _request(self, method: str, route: str, body: Any = None,
                 timeout: float = 60.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(
            self.url + route, data=data, method=method,
            headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _json_or_text(response.read())
        except urllib.error.HTTPError as exc:
            # 4xx/5xx still carry a JSON body (e.g. node_errors on 400) worth returning.
            return exc.code, _json_or_text(exc.read())

    def get(self, route: str, timeout: float = 60.0) -> Any:
        status, payload = self._request("GET", route, timeout=timeout)
        if status != 200:
            raise ComfyServerError(f"GET {route} -> {status}: {payload}\n{self.log_tail()}")
        return payload

    def rss_bytes(self) -> int:
        """The server process's resident memory (VmRSS of /proc/<pid>/status; Linux)."""
        if self.process is None:
            raise ComfyServerError("no server process to measure")
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                value, unit = line.split()[1:3]
                if unit != "kB":
                    raise ComfyServerError(f"unexpected VmRSS unit in /proc/{self.process.pid}/status: {line!r}")
                return int(value) * 1024
        raise ComfyServerError(f"no VmRSS in /proc/{self.process.pid}/status")

    def torch_vram_in_use(self) -> int:
        """Bytes of the first device that torch tensors hold in the server, from /system_stats: what the
        caching allocator reserved (torch_vram_total) less what of it is free (torch_vram_free)."""
        device = self.get("/system_stats")["devices"][0]
        return int(device["torch_vram_total"]) - int(device["torch_vram_free"])

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return f"--- ComfyUI log tail ({self.log_path}) ---\n{_tail(self.log_path, chars)}"

    # ------------------------------------------------------------ API

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info")

    def queue(self, api_prompt: dict[str, Any]) -> tuple[int, Any]:
        """POST /prompt; returns (status, json) unchanged so tests can assert on rejections."""
        return self._request("POST", "/prompt", {"prompt": api_prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Poll /history until the prompt finished; returns its history entry.

        The entry has ``status`` (``status_str`` 'success'/'error', ``messages``:
        [event, data] pairs) and ``outputs`` (node id -> UI output dict).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # The server adds the entry only once the prompt has finished (PromptQueue.task_done).
            try:
                entry = self.get(f"/history/{prompt_id}", timeout=POLL_TIMEOUT_S).get(prompt_id)
            except (TimeoutError, urllib.error.URLError) as exc:
                # A server starved of CPU (a shared machine) can miss one poll: ask again until the deadline.
                log.warning("polling /history/%s: %s; polling again", prompt_id, exc)
                entry = None
            if entry:
                return entry
            self._check_alive()
            time.sleep(POLL_INTERVAL_S)
        # Do not leave a runaway job blocking the queue for the next test.
        self._request("POST", "/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} not done after {timeout:.0f} s\n{self.log_tail()}")

    def run(self, api_prompt: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """Queue and wait; raises ComfyServerError if the server rejects the prompt."""
        status, payload = self.queue(api_prompt)
        if status != 200:
            raise ComfyServerError(
                f"POST /prompt -> {status}: {json.dumps(payload, indent=1)}\n{self.log_tail()}")
        return self.wait(payload["prompt_id"], timeout)

    def output_files(self, entry: dict[str, Any], kind: str = "images") -> list[Path]:
        """Paths of the files a history entry reports under outputs[*][kind] of type 'output'."""
        files = [item for node_out in entry.get("outputs", {}).values()
                 for item in node_out.get(kind, []) if item.get("type") == "output"]
        return [self.output_dir / item.get("subfolder", "") / item["filename"] for item in files]

    # ------------------------------------------------------------ lifecycle

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ComfyServerError(
                f"ComfyUI exited with code {self.process.returncode}\n{self.log_tail()}")

    def wait_until_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if self._request("GET", "/system_stats", timeout=5)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet
            time.sleep(POLL_INTERVAL_S)
        raise ComfyServerError(f"ComfyUI not ready after {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("ComfyUI did not stop within %.0f s; killing it", grace_s)
            self.process.kill()
            self.process.wait(grace_s)


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ServerLayout:
    """Where a test server keeps everything it writes (all under one temp dir)."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def custom_nodes_root(self) -> Path:
        return self.root / "custom_nodes_root"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def user(self) -> Path:
        return self.root / "user"

    @property
    def yaml(self) -> Path:
        return self.root / "extra_model_paths.yaml"

    @property
    def log(self) -> Path:
        return self.root / "comfyui.log"

    def create(self, pack_dir: Path, pack_name: str, models_dir: Path) -> None:
        # --base-directory replaces ComfyUI's own models/ and custom_nodes/, so nothing from
        # the checkout leaks in; its custom_nodes/ must exist (ComfyUI lists it unguarded).
        for folder in (self.base / "custom_nodes", self.custom_nodes_root,
                       self.output, self.input, self.user):
            folder.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes_root / pack_name
        if not link.exists():
            link.symlink_to(pack_dir, target_is_directory=True)
        write_extra_model_paths(self.yaml, self.custom_nodes_root, models_dir)


DEVICES = ("cpu", "cuda")
VRAM_MODES = ("normal", "lowvram", "novram")


def memory_flags(device: str = "cpu", vram: str = "normal") -> list[str]:
    """ComfyUI's command-line memory flags for a device (``cpu``: ``--cpu``; ``cuda``: its GPU mode) and
    a VRAM mode (``normal``, or ``lowvram`` / ``novram``: ``--lowvram`` / ``--novram``, GPU only)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if vram not in VRAM_MODES:
        raise ValueError(f"vram must be one of {', '.join(VRAM_MODES)}, got {vram!r}")
    if device == "cpu":
        if vram != "normal":
            raise ValueError(f"--{vram} needs a GPU: ComfyUI on the CPU has no VRAM to save")
        return ["--cpu"]
    return [] if vram == "normal" else [f"--{vram}"]


def server_command(layout: ServerLayout, port: int, device: str = "cpu", vram: str = "normal") -> list[str]:
    return [
        sys.executable, "main.py", *memory_flags(device, vram), "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(layout.base),
        "--extra-model-paths-config", str(layout.yaml),
        "--output-directory", str(layout.output),
        "--input-directory", str(layout.input),
        # ComfyUI appends "temp" and wipes that folder at start and exit.
        "--temp-directory", str(layout.root),
        "--user-directory", str(layout.user),
        # The default database lives inside the ComfyUI checkout.
        "--database-url", "sqlite:///:memory:",
        # Paid API nodes are never used here and slow the start.
        "--disable-api-nodes",
        "--disable-auto-launch",
    ]


def start_server(comfyui_path: Path, layout: ServerLayout, models_dir: Path, device: str = "cpu",
                 vram: str = "normal") -> ComfyServer:
    """Launch main.py in the memory mode of ``device`` / ``vram`` (see :func:`memory_flags`) and block
    until it answers; on failure the error carries the log tail."""
    port = free_port()
    command = server_command(layout, port, device, vram)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with layout.log.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=comfyui_path, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = ComfyServer(url=f"http://127.0.0.1:{port}", log_path=layout.log,
                         output_dir=layout.output, models_dir=models_dir,
                         input_dir=layout.input, process=process)
    try:
        server.wait_until_ready()
    except BaseException:
        server.stop()
        raise
    log.info("ComfyUI ready at %s in %.1f s", server.url, time.perf_counter() - started)
    return server


WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"


def shipped_workflow_prompt(name: str, server: ComfyServer, size: int | None = None, steps: int = 2) -> dict[str, Any]:
    """API prompt of ``workflows/<name>`` as the frontend would send it, shrunk to ``size`` pixels (by default
    the workflow's ``workflow_models.shrunk_size``) and ``steps`` sampling steps so a 2-core CPU runs it in
    seconds; everything else as shipped."""
    from support.ui_workflow import ui_to_api
    from support.workflow_models import shrunk_size

    size = shrunk_size(name) if size is None else size
    prompt = ui_to_api(json.loads((WORKFLOWS_DIR / name).read_text(encoding="utf-8")), server.object_info())
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=size, height=size)
        if node["class_type"] == "KSampler":
            node["inputs"].update(steps=steps)
    return prompt
