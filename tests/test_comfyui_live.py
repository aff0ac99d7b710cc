"""The pack inside a real ComfyUI: start it headless on the CPU with this pack and tiny models, queue the
API workflows through /prompt and check the saved files. Runs when COMFYUI_PATH points at a ComfyUI
checkout (COMFYUI_PYTHON: its interpreter, default this one); skipped otherwise.

    COMFYUI_PATH=/work/comfyui COMFYUI_PYTHON=/work/comfyvenv/bin/python python -m pytest tests/test_comfyui_live.py
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from node_harness import tiny_models
from test_workflows import NAMES, load, tiny_graph

COMFYUI = os.environ.get("COMFYUI_PATH", "")
PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
PACK = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-kandinsky5"
START_TIMEOUT, RUN_TIMEOUT = 300, 300

pytestmark = pytest.mark.skipif(not (COMFYUI and (Path(COMFYUI) / "main.py").is_file()),
                                reason="set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON) to run it")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ComfyUI process and its HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen, log: Path, output: Path, tiny: Path):
        self.url, self.process, self.log, self.output, self.tiny = url, process, log, output, tiny

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def run(self, graph: dict) -> dict:
        """Queue a prompt and wait for its history entry."""
        status, answer = self.post("/prompt", {"prompt": graph, "client_id": "k5-live-test"})
        assert status == 200, f"ComfyUI refused the prompt: {json.dumps(answer, indent=1)[:3000]}"
        prompt_id = answer["prompt_id"]
        deadline = time.time() + RUN_TIMEOUT
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            assert self.process.poll() is None, f"ComfyUI exited; log:\n{self.log.read_text()[-4000:]}"
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT} s; log:\n{self.log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    models = tiny_models(root / "tiny")
    custom = root / "custom_nodes"
    custom.mkdir()
    (custom / PACK_NAME).symlink_to(PACK, target_is_directory=True)
    config = root / "extra_model_paths.yaml"
    folders = {k: str(models / k) for k in ("diffusion_models", "vae", "text_encoders", "loras")}
    config.write_text("k5_live_test:\n" + "".join(f"  {k}: {v}\n" for k, v in
                                                   {**folders, "custom_nodes": str(custom)}.items()))
    output, inputs, user = root / "output", root / "input", root / "user"
    for d in (output, inputs, user):
        d.mkdir()
    from k5core.media import write_image
    write_image(torch.rand((48, 40, 3), generator=torch.Generator().manual_seed(0)), inputs / "example.png")
    port = _free_port()
    log = root / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("K5_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--output-directory",
           str(output), "--input-directory", str(inputs), "--user-directory", str(user), "--database-url",
           "sqlite:///:memory:", "--extra-model-paths-config", str(config), "--disable-auto-launch",
           "--preview-method", "auto"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=COMFYUI, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log, output, root / "tiny")
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            assert process.poll() is None, f"ComfyUI exited with {process.returncode}; log:\n{log.read_text()[-4000:]}"
            try:
                if "K5Sampler" in server.get("/object_info/K5Sampler"):
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert time.time() < deadline, f"ComfyUI did not list K5Sampler in {START_TIMEOUT} s; log:\n" \
                                           f"{log.read_text()[-4000:]}"
            time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def live_graph(server: Server, name: str) -> dict:
    """An example workflow with the tiny models, their tokenizers, and a tiny size."""
    graph = tiny_graph(load(name, api=True))
    for node in graph.values():
        if node["class_type"] == "K5TextEncoderLoader":
            node["inputs"].update(qwen_tokenizer=str(server.tiny / "comfy/text_encoders/qwen25_tokenizer"),
                                  clip_tokenizer=str(server.tiny / "comfy/sd1_tokenizer"))
    return graph


def test_pack_loads_without_import_errors_and_lists_its_nodes(server):
    info = server.get("/object_info")
    import nodes
    ours = {k: v for k, v in info.items() if k.startswith("K5")}
    assert set(ours) == set(nodes.NODE_CLASS_MAPPINGS)
    assert {v["category"] for v in ours.values()} == {"Kandinsky 5"}
    te = info["K5TextEncoderLoader"]["input"]["required"]["qwen"][0]
    assert {"qwen_2.5_vl_7b_tiny.safetensors", "clip_l_tiny.safetensors", "clip-vit-tiny"} <= set(te)
    assert "LoadImage" in info and "SaveImage" in info
    ours = [line for line in server.log.read_text().splitlines() if PACK_NAME in line]
    assert any("seconds:" in line for line in ours), ours           # in "Import times for custom nodes"
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in ours), ours


def test_workflows_validate_against_the_real_node_definitions(server):
    info = server.get("/object_info")
    for name in NAMES:
        for node_id, node in load(name, api=True).items():
            spec = info[node["class_type"]]["input"]
            declared = {**spec.get("required", {}), **spec.get("optional", {})}
            assert not set(node["inputs"]) - set(declared), f"{name}#{node_id}: inputs unknown to ComfyUI"
            assert set(spec.get("required", {})) <= set(node["inputs"]), f"{name}#{node_id}: missing inputs"


@pytest.mark.parametrize("name, saved", [("lite_t2v", "Kandinsky5/lite_t2v_00001_.mp4"),
                                         ("lite_i2v", "Kandinsky5/lite_i2v_00001_.mp4"),
                                         ("lite_t2i", "Kandinsky5/lite_t2i_00001_.png"),
                                         ("pro_t2v_fp8_swap", "Kandinsky5/pro_t2v_00001_.mp4")])
def test_api_workflow_runs_through_prompt_to_a_saved_file(server, name, saved):
    if name.startswith("pro") and importlib.util.find_spec("k5core.offload") is None:
        pytest.skip("block swap (k5core.offload) is not in this engine build yet")
    entry = server.run(live_graph(server, name))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    path = server.output / saved
    assert path.is_file() and path.stat().st_size > 0
    shown = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert {"filename": path.name, "subfolder": "Kandinsky5", "type": "output"} in shown
    if path.suffix == ".mp4":
        from k5core.media import probe_video
        info = probe_video(path)
        assert (info.frames, info.width, info.height) == (5, 32, 32)


def test_text_encoder_loader_finds_comfyuis_own_tokenizer(server):
    graph = tiny_graph(load("lite_t2v", api=True))      # no tokenizer paths: ComfyUI's qwen25_tokenizer is used
    graph["4"]["inputs"]["prompt"] = f"a fresh prompt {uuid.uuid4()}"
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    message = json.dumps(entry["status"]["messages"])
    assert "comfy/text_encoders/qwen25_tokenizer" in message and "belongs to another model" in message, message[:3000]


def test_free_request_unloads_our_models(server):
    entry = server.run(live_graph(server, "lite_t2v"))               # models cached after the run
    assert entry["status"]["status_str"] == "success"
    assert server.post("/free", {"unload_models": True})[0] == 200
    deadline = time.time() + 60
    while "Kandinsky 5: unloading cached models" not in server.log.read_text():
        assert time.time() < deadline, server.log.read_text()[-3000:]
        time.sleep(0.5)
    graph = live_graph(server, "lite_t2v")
    graph["5"]["inputs"]["seed"] = 43
    assert server.run(graph)["status"]["status_str"] == "success"   # handles load again on demand
