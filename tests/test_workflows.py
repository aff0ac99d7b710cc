"""The example workflows: UI-format graphs (workflows/*.json) and the same graphs in API format
(workflows/api/*.json), checked against the nodes' declarations and one executed with tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nodes
from node_harness import SOCKETS, TINY, call

ROOT = Path(__file__).resolve().parents[1] / "workflows"
NAMES = ("lite_t2v", "lite_i2v", "lite_t2i", "pro_t2v_fp8_swap")
MAPPINGS = nodes.NODE_CLASS_MAPPINGS
# ComfyUI core nodes the workflows use: their inputs and outputs as ComfyUI 0.8.0 declares them
# (test_comfyui_live.py checks them against a real server's /object_info).
CORE = {
    "LoadImage": {"required": {"image": ("COMBO",)}, "widgets": ["image", "upload"], "outputs": ("IMAGE", "MASK")},
    "SaveImage": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING",)}, "widgets": ["filename_prefix"],
                  "outputs": ()},
}
FRONTEND_ONLY = {"Note", "MarkdownNote"}
# the only inputs a user must change: model files (and the I2V input image)
USER_FILES = {("K5ModelLoader", "model_name"), ("K5TextEncoderLoader", "qwen"), ("K5TextEncoderLoader", "clip"),
              ("K5VAELoader", "vae_name"), ("LoadImage", "image")}


def load(name: str, api: bool) -> dict:
    return json.loads((ROOT / ("api" if api else "") / f"{name}.json").read_text(encoding="utf-8"))


def declared(class_type: str) -> tuple[dict, tuple]:
    """(inputs by name -> spec tuple, RETURN_TYPES) of a node type."""
    if class_type in CORE:
        return CORE[class_type]["required"], CORE[class_type]["outputs"]
    cls = MAPPINGS[class_type]
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}, cls.RETURN_TYPES


def widget_names(class_type: str) -> list[str]:
    """Widget order in a UI node's widgets_values, as the frontend writes it (the seed's
    control_after_generate adds a value after the seed)."""
    if class_type in CORE:
        return CORE[class_type]["widgets"]
    names = []
    for name, value in declared(class_type)[0].items():
        if isinstance(value[0], list) or value[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            names.append(name)
            if len(value) > 1 and value[1].get("control_after_generate"):
                names.append("control_after_generate")
    return names


def ui_to_api(ui: dict) -> dict:
    """What the frontend queues for a UI graph (graphToPrompt, for graphs without reroutes/groups)."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        widgets = dict(zip(widget_names(node["type"]), node.get("widgets_values", [])))
        inputs = {k: v for k, v in widgets.items() if k not in ("control_after_generate", "upload")}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, dst, _, _ = links[slot["link"]]
                assert dst == node["id"]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# ----------------------------------------------------------------------------- static checks
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_matches_the_node_declarations(name, tmp_path, monkeypatch):
    monkeypatch.setenv("K5_MODELS_DIR", str(tmp_path))              # empty folders: file inputs unknown
    graph = load(name, api=True)
    unresolved = set()
    for node_id, node in graph.items():
        t = node["class_type"]
        assert t in MAPPINGS or t in CORE, f"{name}#{node_id}: unknown node type {t}"
        spec, _ = declared(t)
        required = MAPPINGS[t].INPUT_TYPES()["required"] if t in MAPPINGS else spec
        assert not required.keys() - node["inputs"].keys(), f"{name}#{node_id} {t}: missing inputs"
        assert not node["inputs"].keys() - spec.keys(), f"{name}#{node_id} {t}: unknown inputs"
        for inp, value in node["inputs"].items():
            kind, opts = (spec[inp] + ({},))[:2]
            if isinstance(value, list):                              # a link [node id, output slot]
                src = graph[value[0]]["class_type"]
                assert declared(src)[1][value[1]] == kind, f"{name}#{node_id}.{inp}: {src} gives another type"
            elif isinstance(kind, list):
                if value not in kind:
                    unresolved.add((t, inp))
            elif kind == "COMBO":
                unresolved.add((t, inp))
            else:
                assert SOCKETS[kind](value), f"{name}#{node_id}.{inp}: {value!r} is not a {kind}"
                if kind in ("INT", "FLOAT"):
                    assert opts.get("min", value) <= value <= opts.get("max", value), f"{name}#{node_id}.{inp}"
    assert unresolved and unresolved <= USER_FILES, f"{name}: inputs a user must change: {sorted(unresolved)}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_the_api_workflow(name):
    ui = load(name, api=False)
    assert {n["type"] for n in ui["nodes"]} & FRONTEND_ONLY, f"{name}: the graph explains itself in a note"
    for link in ui["links"]:                                          # link types match both ends
        _, src, src_slot, dst, dst_slot, kind = link
        nodes_by_id = {n["id"]: n for n in ui["nodes"]}
        assert nodes_by_id[src]["outputs"][src_slot]["type"] == kind
        assert nodes_by_id[dst]["inputs"][dst_slot]["type"] == kind
        assert link[0] in nodes_by_id[src]["outputs"][src_slot]["links"]
    api = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in load(name, api=True).items()}
    assert ui_to_api(ui) == api


def test_every_inference_example_exists_in_both_formats():
    assert set(NAMES) <= {p.stem for p in ROOT.glob("*.json")}
    assert set(NAMES) <= {p.stem for p in (ROOT / "api").glob("*.json")}


# ----------------------------------------------------------------------------- execution
def tiny_graph(graph: dict, image_dir: Path | None = None) -> dict:
    """An API workflow with the tiny models and a small, fast size (what a user changes: files)."""
    graph = json.loads(json.dumps(graph))
    for node in graph.values():
        t, inputs = node["class_type"], node["inputs"]
        if t == "K5ModelLoader":
            file = inputs["model_name"]
            inputs["model_name"] = TINY["i2v" if "i2v" in file else "t2i" if "t2i" in file else "t2v"]
        elif t == "K5TextEncoderLoader":
            inputs.update(qwen=TINY["qwen"], clip=TINY["clip"])
        elif t == "K5VAELoader":
            inputs["vae_name"] = TINY["flux" if inputs["vae_name"] == "ae.safetensors" else "hunyuan"]
        elif t == "K5MemorySettings":
            inputs["blocks_to_swap"] = min(inputs["blocks_to_swap"], 1)
        elif t == "K5Sampler":
            inputs.update(width=32, height=32, frames=min(inputs["frames"], 5), steps=2)
        elif t == "K5VAEEncode":
            inputs.update(width=32, height=32)
    return graph


def execute(graph: dict) -> dict:
    """A small executor: run the nodes in dependency order with `call`, outputs keyed by node id."""
    done: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id not in done:
            node = graph[node_id]
            inputs = {k: run(v[0])[v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            if "prompt" in MAPPINGS[node["class_type"]].INPUT_TYPES().get("hidden", {}):
                inputs["prompt"] = graph
            done[node_id] = call(node["class_type"], **inputs)
        return done[node_id]

    for node_id in graph:
        run(node_id)
    return done


def test_lite_t2v_api_workflow_runs_with_tiny_models(models_dir, tmp_path, monkeypatch):
    from k5core.media import probe_video
    monkeypatch.setenv("K5_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("K5_OUTPUT_DIR", str(tmp_path))
    graph = tiny_graph(load("lite_t2v", api=True))
    outputs = execute(graph)
    (path,) = outputs["8"]
    assert Path(path) == tmp_path / "Kandinsky5" / "lite_t2v_00001_.mp4"
    info = probe_video(path)
    assert (info.frames, info.width, info.height) == (5, 32, 32)
    frames = outputs["7"][0]
    assert frames.shape == (5, 32, 32, 3) and float(frames.std()) > 0.01
    assert torch.equal(outputs["5"][0]["samples"], execute(graph)["5"][0]["samples"])   # seeded
