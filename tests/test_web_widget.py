"""Browser test of the training widget (web/k5_train_view.js, web/k5_train_widget.js).

Headless Debian Chromium driven by the Python `playwright` package loads tests/web/*.html from a
local http.server, replays the recorded trainer event stream tests/data/train_events.jsonl and checks
the DOM against the file's contents. Screenshots go to tests/artifacts/ (gitignored).

Needs /usr/bin/chromium (apt: chromium) and `pip install playwright`; it never downloads browsers
(no `playwright install`). Skips with a reason where either is missing. K5_CHROMIUM overrides the path.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import math
import os
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVENTS_FILE = REPO / "tests" / "data" / "train_events.jsonl"
MOCK_DIR = REPO / "tests" / "web" / "comfy_mock"
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("K5_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SMOOTHING = 0.9  # the view's default EMA weight


# ---------------------------------------------------------------------------------------------
# the recorded stream, as plain Python facts the DOM is checked against


def load_events() -> list[dict]:
    return [json.loads(line) for line in EVENTS_FILE.read_text().splitlines() if line.strip()]


def stream_facts(events: list[dict]) -> dict:
    steps = [e for e in events if e.get("event") == "step"]
    assert steps, f"{EVENTS_FILE} has no step events"
    finite = [e for e in steps if isinstance(e.get("loss"), (int, float)) and math.isfinite(e["loss"])]
    # the view keeps one point per step; a repeated/earlier step replaces the points from it on
    pts: list[dict] = []
    for e in steps:
        while pts and pts[-1]["step"] >= e["step"]:
            pts.pop()
        if e in finite:
            pts.append(e)
    acc, n = 0.0, 0
    for p in pts:
        acc = (1 - SMOOTHING) * p["loss"] if n == 0 else SMOOTHING * acc + (1 - SMOOTHING) * p["loss"]
        n += 1
    ema = acc / (1 - SMOOTHING**n) if n else None
    start = next((e for e in events if e.get("event") == "start"), {})
    terminal = [e for e in events if e.get("event") in ("done", "error", "stopped")]
    last_step_index = max(i for i, e in enumerate(events) if e.get("event") == "step")
    return {
        "steps": steps,
        "points": len(pts),
        "last_ema": ema,
        "last": steps[-1],
        "total": steps[-1].get("total") or start.get("total"),
        "run": start.get("run"),
        "samples": [e for e in events if e.get("event") == "sample"],
        "checkpoints": [e for e in events if e.get("event") == "checkpoint"],
        "terminal": terminal[-1] if terminal else None,
        "last_step_index": last_step_index,
    }


# ---------------------------------------------------------------------------------------------
# local server: the repo over http, plus ComfyUI stand-ins and a generated sample video


def _make_sample_media(kind: str) -> tuple[bytes, str]:
    """A small sample like the trainer's: an mp4 (H.264 via PyAV) or a png; placeholder otherwise."""
    try:
        import numpy as np

        h = w = 160
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        frames = []
        for t in range(24):
            sky = np.stack([200 - yy * 0.6, 110 + yy * 0.3, 160 - yy * 0.5], -1)
            cx, cy = 30 + t * 4.2, 70 + 10 * math.sin(t / 4)
            sun = ((xx - cx) ** 2 + (yy - cy) ** 2) < 18**2
            img = sky.copy()
            img[sun] = (255, 214, 120)
            img[yy > 110] = (40, 70 + t, 120)
            frames.append(np.clip(img, 0, 255).astype(np.uint8))
        if kind == "video":
            import av

            buf = io.BytesIO()
            with av.open(buf, "w", format="mp4") as out:
                stream = out.add_stream("libx264", rate=12)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                for f in frames:
                    for pkt in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                        out.mux(pkt)
                for pkt in stream.encode():
                    out.mux(pkt)
            return buf.getvalue(), "video/mp4"
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frames[12]).save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    except Exception:  # numpy/av/PIL missing: the DOM checks do not need real media
        return b"", "application/octet-stream"


class _Handler(http.server.SimpleHTTPRequestHandler):
    media_cache: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, body: bytes, ctype: str, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path in ("/scripts/app.js", "/scripts/api.js"):  # ComfyUI's modules, mocked
            return self._send((MOCK_DIR / Path(url.path).name).read_bytes(), "text/javascript")
        if url.path in ("/view", "/api/view"):  # ComfyUI's output file route
            name = urllib.parse.parse_qs(url.query).get("filename", [""])[0]
            kind = "video" if name.lower().endswith((".mp4", ".webm", ".mov")) else "image"
            if kind not in self.media_cache:
                self.media_cache[kind] = _make_sample_media(kind)
            body, ctype = self.media_cache[kind]
            return self._send(body, ctype) if body else self._send(b"", "text/plain", 404)
        return super().do_GET()


@pytest.fixture(scope="module")
def base_url():
    handler = functools.partial(_Handler, directory=str(REPO))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set K5_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=20_000)
        try:
            yield b
        finally:
            b.close()


def _open(browser, base_url, page_path, ready_flag, errors):
    page = browser.new_page(viewport={"width": 520, "height": 760}, device_scale_factor=1)
    page.set_default_timeout(10_000)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on(
        "console",
        lambda m: errors.append(f"console.{m.type}: {m.text}")
        if m.type == "error" and "Failed to load resource" not in m.text  # e.g. no media encoder here
        else None,
    )
    page.goto(f"{base_url}{page_path}")
    page.wait_for_function(f"window.{ready_flag} === true")
    return page


def _wait_for_media(page):
    """Give a sample video a moment to show its first frame (cosmetic, for the screenshot)."""
    try:
        page.wait_for_function(
            "() => [...document.querySelectorAll('[data-k5=sample-item]')]"
            ".every(m => m.tagName !== 'VIDEO' || m.readyState >= 2 || m.error)",
            timeout=3000,
        )
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------


def test_modules_parse_with_node():
    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed")
    for name in ("k5_train_view.js", "k5_train_widget.js"):
        r = subprocess.run([node, "--check", str(REPO / "web" / name)], capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, f"{name}: {r.stderr}"


def test_view_replays_recorded_stream(browser, base_url):
    events = load_events()
    facts = stream_facts(events)
    errors: list[str] = []
    page = _open(browser, base_url, "/tests/web/widget_test.html", "k5ready", errors)
    root = page.locator(".k5tv")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    # --- mid-run: the stream up to the step event two thirds of the way in ---
    step_idx = [i for i, e in enumerate(events) if e.get("event") == "step"]
    cut = step_idx[(2 * len(step_idx)) // 3] + 1
    mid = stream_facts(events[:cut])
    page.evaluate(f"k5test.feed({cut})")
    last = mid["last"]
    assert root.get_attribute("data-status") == "running"
    assert root.get_attribute("data-step") == str(last["step"])
    assert root.get_attribute("data-total") == str(mid["total"])
    assert root.get_attribute("data-points") == str(mid["points"])
    assert page.locator('[data-k5="chart"]').get_attribute("data-points") == str(mid["points"])
    assert abs(float(page.locator('[data-k5="chart"]').get_attribute("data-last-ema")) - mid["last_ema"]) < 1e-9
    text = page.locator('[data-k5="progress-text"]').inner_text()
    assert f"{last['step']} / {mid['total']}" in text
    width = page.evaluate("parseFloat(document.querySelector('[data-k5=progress-fill]').style.width)")
    assert abs(width - 100.0 * last["step"] / mid["total"]) < 0.01
    assert page.locator('[data-k5="progress"]').get_attribute("aria-valuenow") == str(last["step"])
    if isinstance(last.get("eta_s"), (int, float)):
        assert page.locator('[data-k5="eta"]').inner_text().startswith("ETA ")
    for key in ("loss", "lr", "speed", "mem"):
        assert page.locator(f'[data-k5="stat-{key}"]').inner_text() not in ("", "–"), key
    if last.get("epoch") is not None:
        assert f"epoch {last['epoch']}" in page.locator('[data-k5="epoch"]').inner_text()
    assert page.evaluate("k5test.chartInk()") > 200, "the loss chart canvas is blank"
    stop = page.locator('[data-k5="stop"]')
    assert stop.is_enabled()
    assert page.locator('[data-k5="resume"]').is_disabled()
    _wait_for_media(page)
    page.locator("#node").screenshot(path=str(ARTIFACTS / "k5_train_widget_running.png"))

    # --- Stop: calls onStop with the run name, disables itself ---
    stop.click()
    page.wait_for_function("window.__k5StopCalled === true")
    assert page.evaluate("k5test.stopCalls") == [mid["run"]]
    assert root.get_attribute("data-status") == "stopping"
    assert stop.is_disabled()

    # --- the rest of the stream ---
    page.evaluate("k5test.feedAll()")
    term = facts["terminal"]
    assert root.get_attribute("data-points") == str(facts["points"])
    assert root.get_attribute("data-samples") == str(len(facts["samples"]))
    assert root.get_attribute("data-checkpoints") == str(len(facts["checkpoints"]))
    if facts["samples"]:
        urls = facts["samples"][-1].get("urls") or []
        items = page.locator('[data-k5="sample-item"]')
        assert items.count() == min(4, len(urls))
        if urls:
            assert items.first.get_attribute("src") == urls[0]
    if term and term["event"] == "done" and not term.get("stopped"):
        lora_name = term.get("lora_name") or Path(term["lora_path"]).name
        assert root.get_attribute("data-status") == "done"
        assert root.get_attribute("data-lora") == lora_name
        assert page.locator('[data-k5="lora"]').inner_text() == lora_name
        assert page.locator('[data-k5="eta"]').inner_text() == "done"
        assert page.locator('[data-k5="resume"]').is_disabled()
    elif term and term["event"] == "done":  # the recording ends with a stop request
        assert root.get_attribute("data-status") == "stopped"
        assert page.locator('[data-k5="resume"]').is_enabled()
    elif term and term["event"] == "error":
        assert root.get_attribute("data-status") == "error"
        assert term.get("message", "") in page.locator('[data-k5="message"]').inner_text()
    assert stop.is_disabled()
    _wait_for_media(page)
    page.locator("#node").screenshot(path=str(ARTIFACTS / "k5_train_widget.png"))

    # --- reload restore: reset + replaying the stream twice gives the same state (idempotent) ---
    state = page.evaluate(
        """() => { const v = k5test.view; v.reset(); v.replay(k5test.events); v.replay(k5test.events);
                   return { points: v.state.points.length, step: v.state.step, status: v.state.status,
                            ema: v.state.points.at(-1).ema }; }"""
    )
    assert state["points"] == facts["points"]
    assert state["step"] >= facts["last"]["step"]
    assert abs(state["ema"] - facts["last_ema"]) < 1e-9
    assert not errors, errors


def test_comfy_extension_routes_events_and_buttons(browser, base_url):
    events = load_events()
    facts = stream_facts(events)
    errors: list[str] = []
    page = _open(browser, base_url, "/tests/web/extension_test.html", "k5extReady", errors)
    ext = "window.k5ext"
    split = page.evaluate(f"{ext}.split")
    run = page.evaluate(f"{ext}.run")

    assert "k5.train" in page.evaluate(f"{ext}.registered")
    assert page.evaluate(f"{ext}.api.calls[0].route") == "/k5/train/status"
    # the DOM widget went onto both Train nodes, is display-only and widens the node
    for n in ("nodeA", "nodeB"):
        widgets = page.evaluate(f"{ext}.{n}.widgets.map(w => [w.name, w.options?.serialize])")
        assert ["k5_train_progress", False] in widgets
        assert page.evaluate(f"{ext}.{n}.size[0]") >= 400

    # status restore went to node 7 only
    restored = [e for e in events[:split] if e.get("event") == "step"]
    a = page.evaluate(f"{ext}.root(7)")
    assert a["status"] == "running"
    assert a["step"] == str(restored[-1]["step"] if restored else 0)
    assert page.evaluate(f"{ext}.root(8)")["status"] == "idle"

    # live events route by node id; a second restore-sized overlap does not duplicate points
    page.evaluate(f"{ext}.send({max(0, split - 5)}, {facts['last_step_index'] + 1})")
    a = page.evaluate(f"{ext}.root(7)")
    assert a["step"] == str(facts["last"]["step"])
    assert a["points"] == str(facts["points"])
    assert page.evaluate(f"{ext}.root(8)")["events"] == "0"
    page.evaluate(f"{ext}.send(0, 3, '8')")
    assert page.evaluate(f"{ext}.root(8)")["events"] == "3"
    assert page.evaluate(f"{ext}.root(7)")["step"] == str(facts["last"]["step"])

    # Stop -> POST /k5/train/stop {"run": run}
    assert not page.evaluate(f"{ext}.disabled(7, 'stop')")
    page.evaluate(f"{ext}.click(7, 'stop')")
    page.wait_for_function(f"{ext}.api.calls.some(c => c.route === '/k5/train/stop')")
    call = page.evaluate(f"{ext}.api.calls.find(c => c.route === '/k5/train/stop')")
    assert call["method"] == "POST"
    assert json.loads(call["body"]) == {"run": run}
    assert page.evaluate(f"{ext}.root(7)")["status"] == "stopping"

    # the trainer ends early -> stopped; Resume sets resume=true and queues the prompt
    page.evaluate(f"{ext}.sendRaw({{event: 'done', stopped: true, node: '7', run: {json.dumps(run)}}})")
    assert page.evaluate(f"{ext}.root(7)")["status"] == "stopped"
    assert not page.evaluate(f"{ext}.disabled(7, 'resume')")
    page.evaluate(f"{ext}.click(7, 'resume')")
    page.wait_for_function(f"{ext}.app.queued.length === 1")
    assert page.evaluate(f"{ext}.app.queued[0].number") == 0
    assert page.evaluate(f"{ext}.nodeA.widgets.find(w => w.name === 'resume').value") is True
    assert page.evaluate(f"{ext}.nodeB.widgets.find(w => w.name === 'resume').value") is False
    assert page.evaluate(f"{ext}.root(7)")["status"] == "queued"

    # ComfyUI interrupting the node while queued/running marks it stopped
    page.evaluate(
        f"{ext}.api.dispatchCustomEvent('execution_interrupted', {{node_id: '7', node_type: 'K5TrainLoRA'}})"
    )
    assert page.evaluate(f"{ext}.root(7)")["status"] == "stopped"
    assert not errors, errors
