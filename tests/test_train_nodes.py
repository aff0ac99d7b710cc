"""The LoRA training nodes against the real trainer on tiny models: K5 Dataset -> K5 Cache Builder ->
K5 Train LoRA (a `python -m trainer` subprocess) -> K5 LoRA Loader -> K5 Sampler.

A recorder stands where ComfyUI's PromptServer would (`sys.modules["server"]`): it records every
`send_sync` and holds the aiohttp route table the pack registers its /k5/train/ routes on; the routes
are called over HTTP with aiohttp's test server. ComfyUI's Cancel is the fake comfy.model_management
of conftest.
"""
from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
import tomllib
import types
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from nodes import comfy, train_runs
from nodes.cache import CACHE, LoraSpec, ModelHandle
from nodes.train import K5Dataset, K5TrainLoRA, config_to_dict
from node_harness import MAPPINGS, TINY, call, encode, loaders, sample

RUN_SETTINGS = dict(max_train_epochs=0, learning_rate=1e-3, network_dim=4, network_alpha=4.0, optimizer_type="adamw",
                    lr_scheduler="constant", lr_warmup_steps=0.0, gradient_accumulation_steps=1,
                    timestep_sampling="shift", discrete_flow_shift=3.0, gradient_checkpointing=False,
                    save_every_n_steps=0, save_state=False, train_seed=1, resume=False,
                    extra_settings="max_data_loader_n_workers = 0")
NODE_ID = "17"


# ----------------------------------------------------------------------------- fixtures
class Recorder:
    """Stands in for PromptServer.instance: records send_sync calls, holds the route table."""

    def __init__(self):
        self.routes = web.RouteTableDef()
        self.messages: list[tuple[str, dict, object]] = []
        self.on_event = None

    def send_sync(self, event, data, sid=None):
        json.dumps(data, allow_nan=False)               # what the websocket sends must be strict JSON
        self.messages.append((event, data, sid))
        if self.on_event is not None:
            self.on_event(data)

    def events(self, kind=None) -> list[dict]:
        return [d for e, d, _ in self.messages if e == "k5.train" and (kind is None or d["event"] == kind)]

    def wait_for(self, predicate, timeout=60.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for d in self.events():
                if predicate(d):
                    return d
            time.sleep(0.05)
        raise AssertionError(f"no such event within {timeout} s; got {[d['event'] for d in self.events()]}")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_nodes")


@pytest.fixture(autouse=True)
def comfy_env(models_dir, root, monkeypatch):
    """ComfyUI absent: tiny model folders and one output folder for the module."""
    monkeypatch.setenv(comfy.MODELS_ENV, str(models_dir))
    monkeypatch.setenv(comfy.OUTPUT_ENV, str(root / "output"))
    return root / "output"


@pytest.fixture
def recorder(monkeypatch):
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=Recorder())
    monkeypatch.setitem(sys.modules, "server", server)
    assert train_runs.register_routes()
    return server.PromptServer.instance


@pytest.fixture(scope="module")
def cached(root, models_dir):
    """A tiny dataset (two 9-frame clips, one image) with T2V caches built through the nodes."""
    from k5core.tiny.dataset import make_tiny_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(comfy.MODELS_ENV, str(models_dir))
        toml = make_tiny_dataset(root / "data", n_videos=2, n_images=1, frames=9)
        dataset, summary = call("K5Dataset", **dataset_inputs(dataset_config=str(toml)))
        model, te, vae = loaders()
        built, report = call("K5CacheBuilder", dataset=dataset, model=model, vae=vae, text_encoder=te,
                             skip_existing=True, batch_size=1)
    return types.SimpleNamespace(dataset=built, summary=summary, report=report, model=model, te=te, vae=vae,
                                 toml=toml)


def dataset_inputs(**kw) -> dict:
    base = dict(video_folders="", image_folders="", width=64, height=64, target_frames="9", frame_extraction="head",
                frame_stride=1, frame_sample=1, max_frames=129, num_repeats=1, batch_size=1, enable_bucket=False,
                caption_extension=".txt", cache_directory="", dataset_config="")
    return {**base, **kw}


def train(cached, name, steps, model=None, **kw):
    """Run the Train node as ComfyUI does; returns the LoRA path."""
    inputs = dict(dataset=cached.dataset, model=model or cached.model, output_name=name, max_train_steps=steps,
                  **{**RUN_SETTINGS, **kw}, unique_id=NODE_ID)
    return call("K5TrainLoRA", **inputs)[0]


def http(routes, method, path, **kw):
    """One request to an app serving `routes`; returns (status, JSON body)."""
    async def go():
        app = web.Application()
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            r = await client.request(method, path, **kw)
            return r.status, await r.json()
    return asyncio.run(go())


# ----------------------------------------------------------------------------- dataset and caches
def test_dataset_node_takes_folders_or_a_toml_and_checks_them_at_queue_time(tmp_path):
    from k5core.tiny.dataset import make_tiny_dataset
    toml = make_tiny_dataset(tmp_path / "d", n_videos=2, n_images=1, frames=9, corrupt=True)
    videos, images = tmp_path / "d" / "videos", tmp_path / "d" / "images"
    dataset, summary = call("K5Dataset", **dataset_inputs(video_folders=f"{videos}\n", image_folders=str(images),
                                                          cache_directory=str(tmp_path / "cache")))
    assert summary.startswith("3 items (2 video windows, 1 images); 2 left out")
    assert "broken.mp4" in summary and "empty.mp4" in summary
    tables = dataset.config["datasets"]
    assert [t.get("video_directory") or t.get("image_directory") for t in tables] == [str(videos), str(images)]
    assert [Path(t["cache_directory"]).name for t in tables] == ["00_videos", "01_images"]
    assert tables[0]["target_frames"] == [9] and "target_frames" not in tables[1]
    assert config_to_dict(dataset.load()) == dataset.config                    # a fixed point: nothing lost

    from_toml, summary2 = call("K5Dataset", **dataset_inputs(dataset_config=str(toml)))
    assert summary2.split(";")[0] == summary.split(";")[0]
    assert from_toml.config["datasets"][0]["cache_directory"] == str(tmp_path / "d" / "cache" / "videos")

    v = K5Dataset.VALIDATE_INPUTS
    assert v(str(videos), "", "9", "") is True
    assert v(None, "", "9", "") is True                                        # a linked input: checked later
    assert v("", "", "9", "") == ("no data: set video_folders and/or image_folders (one folder a line), "
                                  "or a dataset TOML")
    assert "not both" in v(str(videos), "", "9", str(toml))
    assert v(f"{videos}\n{tmp_path / 'nope'}", "", "9", "") == f"video_folders: {tmp_path / 'nope'} is not a folder"
    assert "target_frames: expected whole numbers" in v(str(videos), "", "9 frames", "")
    assert v("", "", "9", str(tmp_path / "missing.toml")).endswith("missing.toml is not a file")
    with pytest.raises(ValueError, match="not both"):
        call("K5Dataset", **dataset_inputs(video_folders=str(videos), dataset_config=str(toml)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable items"):
        call("K5Dataset", **dataset_inputs(image_folders=str(empty)))

    # the fingerprint follows media and captions, not the caches written beside them
    changed = lambda: K5Dataset.IS_CHANGED(video_folders=str(videos), image_folders="", dataset_config="")
    before = changed()
    (videos / "clip0_0000x0000_kandinsky5.safetensors").write_bytes(b"cache")
    assert changed() == before
    (videos / "clip0.txt").write_text("a new caption")
    assert changed() != before


def test_cache_builder_builds_skips_and_stops_on_cancel(cached, fake_comfyui):
    from k5core.cache import list_cached_items
    assert cached.report.startswith("latents: cached 3, skipped 0 (already cached), failed 0")
    assert "\ntext: cached 3, skipped 0" in cached.report
    assert cached.dataset.cached_for == "k5-tiny-t2v"
    assert len(list_cached_items(cached.dataset.load(), task="k5-tiny-t2v")) == 3
    assert CACHE.loaded("vae") == [] and CACHE.loaded("text") == []              # freed for the training

    loads = sum(CACHE.loads.values())
    again = call("K5CacheBuilder", dataset=cached.dataset, model=cached.model, vae=cached.vae,
                 text_encoder=cached.te, skip_existing=True, batch_size=1)[1]
    assert again == "latents: all 3 cached already\ntext: all 3 cached already"
    assert sum(CACHE.loads.values()) == loads                                    # nothing was loaded

    from k5core.cache import all_items, latent_cache_path
    for item in all_items(cached.dataset.load()):
        latent_cache_path(item).unlink()
    fake_comfyui.state.interrupt_after = 1                      # Cancel pressed when the first item is done
    with pytest.raises(fake_comfyui.mm.InterruptProcessingException):
        call("K5CacheBuilder", dataset=cached.dataset, model=cached.model, vae=cached.vae,
             text_encoder=cached.te, skip_existing=True, batch_size=1)
    assert fake_comfyui.state.steps == [(1, 3)] and fake_comfyui.state.interrupted is False
    fake_comfyui.state.interrupt_after = None
    assert call("K5CacheBuilder", dataset=cached.dataset, model=cached.model, vae=cached.vae, text_encoder=cached.te,
                skip_existing=True, batch_size=1)[1] == \
        "latents: cached 2, skipped 1 (already cached), failed 0\ntext: all 3 cached already"


# ----------------------------------------------------------------------------- training
def test_train_node_relays_every_event_and_returns_a_lora_the_loader_takes(cached, recorder, comfy_env,
                                                                           fake_comfyui):
    lora = train(cached, "full", 4, sample_prompt="a red square moving right --w 32 --h 32 --f 5 --s 2 --d 1",
                 sample_every_n_steps=2, vae=cached.vae, text_encoder=cached.te)
    folder = comfy_env / "k5_train" / "full"
    assert lora == str(folder / "full.safetensors") and Path(lora).is_file()

    # run.toml: exactly the trainer's keys, as the trainer reads them
    from trainer.config import FIELDS, load_config
    settings = tomllib.loads((folder / "run.toml").read_text())
    assert set(settings) <= set(FIELDS)
    cfg = load_config(["--config", str(folder / "run.toml")])
    assert (cfg.task, cfg.dit, cfg.output_dir, cfg.max_train_steps, cfg.learning_rate, cfg.network_dim) == \
        ("k5-tiny-t2v", cached.model.path, str(folder), 4, 1e-3, 4)
    assert cfg.dataset_config == str(folder / "dataset.toml") and cfg.sample_every_n_steps == 2
    assert tomllib.loads((folder / "dataset.toml").read_text()) == cached.dataset.config

    # every trainer event, in order, unchanged, with node and run added
    events = recorder.events()
    kinds = [e["event"] for e in events]
    assert all(e["node"] == NODE_ID and e["run"] == "full" for e in events)
    assert kinds.index("start") < kinds.index("step") and kinds[-1] == "done"
    assert [e["step"] for e in recorder.events("step")] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) and e["total"] == 4 for e in recorder.events("step"))
    assert [s["step"] for s in recorder.events("sample")] == [2, 4]
    done = recorder.events("done")[0]
    assert (done["lora_path"], done["stopped"], done["step"]) == (lora, False, 4)
    assert all(sid is None for _, _, sid in recorder.messages)
    for s in recorder.events("sample"):                            # samples are served by ComfyUI's /view
        (url,) = s["urls"]
        q = parse_qs(urlsplit(url).query)
        assert urlsplit(url).path == "/view" and q["type"] == ["output"] and q["subfolder"] == ["k5_train/full/samples"]
        assert (comfy_env / q["subfolder"][0] / q["filename"][0]).resolve() == Path(s["paths"][0]).resolve()
        assert Path(s["paths"][0]).is_file()
    assert fake_comfyui.state.steps == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # ComfyUI's progress bar

    # the status route replays the run; the runs route lists it
    status, body = http(recorder.routes, "GET", "/k5/train/status")
    assert status == 200 and body["running"] is False and (body["run"], body["node"]) == ("full", NODE_ID)
    assert body["events"] == events and body["last"] == done
    status, body = http(recorder.routes, "GET", "/k5/train/runs")
    (run,) = [r for r in body["runs"] if r["name"] == "full"]
    assert run["final"] is True and run["folder"] == "k5_train/full"
    assert "k5_train/full/full.safetensors" in run["loras"]

    # the LoRA loader takes the K5_LORA, and the LoRA changes what the model samples
    (with_lora,) = call("K5LoRALoader", model=cached.model, lora_name="none", strength=1.0, mode="auto", lora=lora)
    assert [l.path for l in with_lora.loras] == [lora]
    embeds = encode(cached.te)
    base, tuned = sample(cached.model, embeds, seed=5)["samples"], sample(with_lora, embeds, seed=5)["samples"]
    assert (tuned - base).abs().max() > 1e-4

    # queued again without resume: the run is not overwritten
    with pytest.raises(ValueError, match="already holds run 'full'.*turn on resume"):
        train(cached, "full", 4)
    assert len(recorder.events("start")) == 1                       # no second trainer was started


def test_stop_route_saves_the_state_and_resume_continues(cached, recorder, comfy_env):
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(lora=train(cached, "stopme", 400, save_every_n_steps=0)))
    worker.start()
    try:
        recorder.wait_for(lambda e: e["event"] == "step" and e["step"] >= 2)
        status, body = http(recorder.routes, "GET", "/k5/train/status")
        assert body["running"] is True and body["run"] == "stopme" and body["node"] == NODE_ID
        assert body["events"][0]["event"] in ("log", "start") and body["last"]["event"] in ("step", "epoch", "log")
        assert http(recorder.routes, "POST", "/k5/train/stop", json={"run": "other"}) == \
            (409, {"ok": False, "error": "run 'other' is not running (running: 'stopme')"})
        assert http(recorder.routes, "POST", "/k5/train/stop", json={"run": "stopme"}) == (200, {"ok": True})
    finally:
        worker.join(timeout=120)
    assert not worker.is_alive()
    done = recorder.events("done")[-1]
    stopped_at = done["step"]
    assert done["stopped"] is True and 2 <= stopped_at < 400
    folder = comfy_env / "k5_train" / "stopme"
    assert result["lora"] == str(folder / f"stopme-step{stopped_at:08d}.safetensors") and Path(result["lora"]).is_file()
    assert (folder / f"stopme-step{stopped_at:08d}-state" / "train_state.json").is_file()
    assert not (folder / "stopme.stop").exists()
    assert http(recorder.routes, "POST", "/k5/train/stop", json={"run": None}) == \
        (409, {"ok": False, "error": "no training is running"})

    # the widget's Resume: resume on, queued again -> continues from the saved step
    changed = K5TrainLoRA.IS_CHANGED(output_name="stopme", resume=True)
    assert changed and changed == K5TrainLoRA.IS_CHANGED(output_name="stopme", resume=True)
    assert K5TrainLoRA.IS_CHANGED(output_name="stopme", resume=False) == ""
    recorder.messages.clear()
    lora = train(cached, "stopme", stopped_at + 2, resume=True)
    assert lora == str(folder / "stopme.safetensors")
    start = recorder.events("start")[0]
    assert start["step"] == stopped_at and start["total"] == stopped_at + 2
    assert [e["step"] for e in recorder.events("step")] == [stopped_at + 1, stopped_at + 2]
    assert K5TrainLoRA.IS_CHANGED(output_name="stopme", resume=True) != changed


@pytest.mark.parametrize("hook", [True, False], ids=["progress-hook-raises", "flag-polled"])
def test_cancel_in_comfyui_stops_the_trainer_gracefully(cached, recorder, comfy_env, fake_comfyui, monkeypatch, hook):
    """Cancel reaches the node either as the exception ComfyUI's progress hook raises (a real ComfyUI)
    or as the interrupt flag polled between events; either way the trainer saves and exits."""
    def throw_if_interrupted():                 # ComfyUI's own: raises once and clears the flag
        if fake_comfyui.state.interrupted:
            fake_comfyui.state.interrupted = False
            raise fake_comfyui.mm.InterruptProcessingException()
    bar = sys.modules["comfy.utils"].ProgressBar
    update = bar.update_absolute

    def update_and_check(self, value, total=None, preview=None):
        update(self, value, total, preview)
        throw_if_interrupted()                  # what ComfyUI's progress hook (main.py) does on every update
    if hook:
        monkeypatch.setattr(bar, "update_absolute", update_and_check)

    pressed = []

    def cancel_at_step_two(event):                # the user presses Cancel once
        if event["event"] == "step" and event["step"] >= 2 and not pressed:
            pressed.append(event["step"])
            fake_comfyui.state.interrupted = True
    recorder.on_event = cancel_at_step_two
    with pytest.raises(fake_comfyui.mm.InterruptProcessingException):
        train(cached, f"cancelled-{hook}", 400)
    done = recorder.events("done")[-1]
    assert done["stopped"] is True and done["step"] < 400
    assert (comfy_env / "k5_train" / f"cancelled-{hook}" / f"cancelled-{hook}-step{done['step']:08d}-state").is_dir()
    assert fake_comfyui.state.interrupted is False                 # cleared, as ComfyUI's own nodes do


def test_a_trainer_crash_surfaces_its_error_message(cached, recorder, models_dir):
    not_a_dit = ModelHandle(str(models_dir / "vae" / TINY["hunyuan"]), "k5-tiny-t2v")
    with pytest.raises(RuntimeError) as error:
        train(cached, "crash", 4, model=not_a_dit)
    (event,) = recorder.events("error")
    assert event["message"] and event["message"] in str(error.value)
    assert str(error.value).startswith("K5 Train LoRA: training failed: ") and TINY["hunyuan"] in str(error.value)
    assert http(recorder.routes, "GET", "/k5/train/status")[1]["last"] == event

    tail = "step 99/400\nTraceback ...\nMemoryError"
    ended = train_runs.Outcome(returncode=-9, done=None, error=None, stderr=tail, stop_reason=None)
    assert ended.failure() == f"the trainer ended without finishing (killed by signal 9); its last output:\n{tail}"
    crashed = train_runs.Outcome(returncode=1, done=None, error="RuntimeError: boom", stderr=tail, stop_reason=None)
    assert crashed.failure() == f"training failed: RuntimeError: boom\n--- trainer stderr (last lines) ---\n{tail}"
    job = train_runs.Job("x", "1", Path("."))
    for i in range(100):
        job.receive(f"not an event {i}\n")
    assert list(job.stderr_tail) == [f"not an event {i}" for i in range(70, 100)] and job.events == []


# ----------------------------------------------------------------------------- settings, paths, routes
def test_settings_are_checked_before_a_trainer_starts(cached, recorder):
    with pytest.raises(ValueError, match="extra_settings: the node sets output_dir itself"):
        train(cached, "bad", 4, extra_settings='output_dir = "/tmp"')
    with pytest.raises(ValueError, match="learning_rate already set by the node's inputs"):
        train(cached, "bad", 4, extra_settings="learning_rate = 0.1")
    with pytest.raises(ValueError, match="extra_settings: not valid TOML"):
        train(cached, "bad", 4, extra_settings="max_grad_norm = ")
    with pytest.raises(ValueError, match=r"unknown key 'max_grad_nrm' \(did you mean max_grad_norm\?\)"):
        train(cached, "bad", 4, extra_settings="max_grad_nrm = 0.5")
    with pytest.raises(ValueError, match="samples need the vae and text_encoder input"):
        train(cached, "bad", 4, sample_prompt="a cat", sample_every_n_steps=2)
    with pytest.raises(ValueError, match="the K5_MODEL carries LoRAs"):
        train(cached, "bad", 4, model=cached.model.with_lora(LoraSpec("x.safetensors")))
    i2v = ModelHandle(cached.model.path, "k5-tiny-i2v")
    with pytest.raises(ValueError, match="Connect a K5 Cache Builder with this model"):
        train(cached, "bad", 4, model=i2v)
    assert recorder.events() == []                                  # no trainer was started


def test_names_and_paths_stay_inside_the_output_folder(comfy_env, recorder, tmp_path):
    for bad in ("../escape", "a/b", "..", "", ".hidden", "x" * 101, "a\\b", "run..x"):
        with pytest.raises(train_runs.RunError):
            train_runs.run_dir(bad)
        assert isinstance(K5TrainLoRA.VALIDATE_INPUTS(output_name=bad), str)
    assert K5TrainLoRA.VALIDATE_INPUTS(output_name="my_lora-v1.2") is True
    outside = tmp_path / "outside"
    outside.mkdir()
    root = comfy_env / "k5_train"
    root.mkdir(parents=True, exist_ok=True)
    (root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(train_runs.RunError, match="outside the output folder"):
        train_runs.run_dir("evil")
    assert "evil" not in [r["name"] for r in http(recorder.routes, "GET", "/k5/train/runs")[1]["runs"]]
    assert train_runs.view_url(outside / "x.mp4") is None
    assert train_runs.view_url(comfy_env / "k5_train" / "a b" / "s.mp4") == \
        "/view?filename=s.mp4&subfolder=k5_train/a%20b&type=output"
    assert http(recorder.routes, "POST", "/k5/train/stop", data=b"{not json")[0] == 400
    assert http(recorder.routes, "POST", "/k5/train/stop", json=["run"])[0] == 400


def test_routes_are_registered_once_and_only_inside_comfyui(recorder, monkeypatch):
    paths = sorted((r.method, r.path) for r in recorder.routes)
    assert paths == [("GET", "/k5/train/runs"), ("GET", "/k5/train/status"), ("POST", "/k5/train/stop")]
    assert train_runs.register_routes() and len(recorder.routes) == 3          # no second copy
    monkeypatch.delitem(sys.modules, "server")
    assert train_runs.register_routes() is False


# ----------------------------------------------------------------------------- the example workflow
WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _spec(class_type: str) -> dict:
    spec = MAPPINGS[class_type].INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def test_training_workflow_files_match_the_nodes():
    """UI and API format describe the same graph, with every widget value where the node expects it."""
    api = json.loads((WORKFLOWS / "api" / "lora_training.json").read_text())
    ui = json.loads((WORKFLOWS / "lora_training.json").read_text())
    types_of = {nid: n["class_type"] for nid, n in api.items()}
    assert {"K5Dataset", "K5CacheBuilder", "K5TrainLoRA", "K5LoRALoader", "K5Sampler"} <= set(types_of.values())
    edges = set()
    for nid, node in api.items():
        spec = _spec(node["class_type"])
        required = MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]
        assert required.keys() <= node["inputs"].keys() <= spec.keys(), nid
        for name, value in node["inputs"].items():
            kind = spec[name][0]
            if isinstance(value, list):                                  # a link [node id, output slot]
                out = MAPPINGS[types_of[value[0]]].RETURN_TYPES[value[1]]
                assert out == kind, f"{nid}.{name}: {out} into {kind}"
                edges.add((int(value[0]), value[1], int(nid), name))
            elif isinstance(kind, list):
                assert value in kind or name in ("model_name", "vae_name", "qwen", "clip"), f"{nid}.{name}={value!r}"
            else:
                assert kind in WIDGET_TYPES, f"{nid}.{name}"
    ui_nodes = {n["id"]: n for n in ui["nodes"] if n["type"] != "Note"}
    assert {str(i): n["type"] for i, n in ui_nodes.items()} == types_of
    ui_edges = set()
    for link_id, src, slot, dst, dst_slot, kind in ui["links"]:
        target = ui_nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] == kind
        assert link_id in ui_nodes[src]["outputs"][slot]["links"]
        ui_edges.add((src, slot, dst, target["name"]))
    assert ui_edges == edges
    for nid, node in ui_nodes.items():                 # widgets_values: widget order (+ seed control value)
        values = []
        for name, value in _spec(node["type"]).items():
            if isinstance(value[0], list) or value[0] in WIDGET_TYPES:
                values.append(api[str(nid)]["inputs"][name])
                if (value[1] if len(value) > 1 else {}).get("control_after_generate"):
                    values.append("fixed")
        assert node["widgets_values"] == values, node["type"]


def test_training_workflow_runs_on_tiny_models(root, recorder, comfy_env):
    """The API workflow, executed node by node as ComfyUI would, with tiny files and short settings."""
    from k5core.media import probe_video
    from k5core.tiny.dataset import make_tiny_dataset
    make_tiny_dataset(root / "wf_data", n_videos=1, n_images=0, frames=9)
    graph = json.loads((WORKFLOWS / "api" / "lora_training.json").read_text())
    tiny = {"model_name": TINY["t2v"], "vae_name": TINY["hunyuan"], "qwen": TINY["qwen"], "clip": TINY["clip"],
            "video_folders": str(root / "wf_data" / "videos"), "width": 64, "height": 64, "target_frames": "9",
            "max_train_steps": 2, "max_train_epochs": 0, "optimizer_type": "adamw", "sample_every_n_steps": 0,
            "extra_settings": "max_data_loader_n_workers = 0", "frames": 5, "steps": 2, "output_name": "workflow"}
    by_type = {"K5Sampler": {"width": 32, "height": 32}}
    outputs: dict = {}

    def run(nid: str):
        if nid not in outputs:
            node = graph[nid]
            inputs = {k: run(v[0])[v[1]] if isinstance(v, list) else tiny.get(k, v) for k, v in node["inputs"].items()}
            inputs.update(by_type.get(node["class_type"], {}))
            if node["class_type"] == "K5TrainLoRA":
                inputs["unique_id"] = nid
            outputs[nid] = call(node["class_type"], **inputs)
        return outputs[nid]

    for nid, node in graph.items():
        if getattr(MAPPINGS[node["class_type"]], "OUTPUT_NODE", False):
            run(nid)
    (train_id,) = [n for n, v in graph.items() if v["class_type"] == "K5TrainLoRA"]
    (save_id,) = [n for n, v in graph.items() if v["class_type"] == "K5SaveVideo"]
    assert outputs[train_id][0] == str(comfy_env / "k5_train" / "workflow" / "workflow.safetensors")
    assert [e["step"] for e in recorder.events("step")] == [1, 2] and recorder.events("step")[0]["node"] == train_id
    settings = tomllib.loads((comfy_env / "k5_train" / "workflow" / "run.toml").read_text())
    assert settings["gradient_checkpointing"] is True and settings["save_state"] is True
    info = probe_video(outputs[save_id][0])
    assert (info.frames, info.width, info.height) == (5, 32, 32)
