// K5 LoRA training view: a pure DOM module (no ComfyUI imports).
//
//   import { createTrainView } from "./k5_train_view.js";
//   const view = createTrainView(rootElement, { onStop, onResume, resolveUrl, smoothing });
//   view.handle(event)      // one trainer event (object or JSON string)
//   view.replay(events)     // many events in order
//   view.reset()            // back to the empty state
//   view.setStatus(s, msg)  // "idle" | "queued" | "running" | "stopping" | "stopped" | "done" | "error"
//   view.redraw()           // draw the loss chart now (normally batched on requestAnimationFrame)
//   view.destroy()
//   view.state              // live state: step, total, points [{step, loss, ema}], samples, ...
//
// Events are the trainer's JSON lines: start, step, epoch, sample, checkpoint, log, error, done.
// The root element mirrors the state in data attributes (data-status, data-step, data-total,
// data-points, data-samples, data-checkpoints, data-lora) so tests and tools can read it from the DOM.
//
// ComfyUI loads every .js file of a pack's web folder as an extension; this module only exports,
// so loading it that way does nothing.

const STYLE_ID = "k5-train-view-style";

const CSS = `
.k5tv {
  --k5-fg: var(--input-text, #dddddd);
  --k5-muted: var(--descrip-text, #9a9a9a);
  --k5-bg: var(--comfy-input-bg, #222222);
  --k5-panel: rgba(255, 255, 255, 0.035);
  --k5-border: var(--border-color, #444444);
  --k5-accent: #4ea1ff;
  --k5-raw: rgba(140, 170, 210, 0.45);
  --k5-ema: #ffb347;
  --k5-grid: rgba(255, 255, 255, 0.08);
  --k5-ok: #4cc38a;
  --k5-warn: #e9b949;
  --k5-err: #ef5b5b;
  box-sizing: border-box;
  width: 100%;
  height: 100%;
  min-height: 0;
  display: flex;
  flex-direction: column;
  gap: 6px;
  padding: 6px;
  color: var(--k5-fg);
  background: var(--k5-bg);
  border: 1px solid var(--k5-border);
  border-radius: 6px;
  font: 12px/1.3 var(--k5-font, system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif);
  overflow: hidden;
  user-select: none;
}
.k5tv * { box-sizing: border-box; }
.k5tv .k5-num { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-variant-numeric: tabular-nums; }
.k5tv .k5-head { display: flex; align-items: center; gap: 6px; min-height: 18px; }
.k5tv .k5-pill { display: inline-flex; align-items: center; gap: 5px; padding: 1px 7px; border-radius: 9px; font-size: 10px; font-weight: 600; letter-spacing: 0.06em; text-transform: uppercase; background: rgba(255,255,255,0.07); color: var(--k5-muted); flex: none; }
.k5tv .k5-pill::before { content: ""; width: 6px; height: 6px; border-radius: 50%; background: currentColor; }
.k5tv[data-status="running"] .k5-pill { color: var(--k5-accent); background: rgba(78,161,255,0.12); }
.k5tv[data-status="running"] .k5-pill::before { animation: k5-pulse 1.2s ease-in-out infinite; }
.k5tv[data-status="queued"] .k5-pill, .k5tv[data-status="stopping"] .k5-pill, .k5tv[data-status="stopped"] .k5-pill { color: var(--k5-warn); background: rgba(233,185,73,0.12); }
.k5tv[data-status="done"] .k5-pill { color: var(--k5-ok); background: rgba(76,195,138,0.12); }
.k5tv[data-status="error"] .k5-pill { color: var(--k5-err); background: rgba(239,91,91,0.12); }
@keyframes k5-pulse { 50% { opacity: 0.25; } }
.k5tv .k5-run { flex: 1 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; font-weight: 600; }
.k5tv .k5-bar { position: relative; height: 20px; border-radius: 4px; background: rgba(255,255,255,0.06); overflow: hidden; flex: none; }
.k5tv .k5-fill { position: absolute; inset: 0 auto 0 0; width: 0%; background: linear-gradient(90deg, #2f6fd6, var(--k5-accent)); transition: width 0.25s ease-out; }
.k5tv[data-status="done"] .k5-fill { background: linear-gradient(90deg, #2e9b6a, var(--k5-ok)); }
.k5tv[data-status="error"] .k5-fill { background: linear-gradient(90deg, #a33a3a, var(--k5-err)); }
.k5tv[data-status="stopped"] .k5-fill, .k5tv[data-status="stopping"] .k5-fill { background: linear-gradient(90deg, #9c7a25, var(--k5-warn)); }
.k5tv .k5-bartext { position: absolute; inset: 0; display: flex; align-items: center; gap: 8px; padding: 0 7px; font-size: 11px; color: #fff; text-shadow: 0 1px 2px rgba(0,0,0,0.7); white-space: nowrap; }
.k5tv .k5-bartext .k5-epoch { flex: 1 1 auto; text-align: center; opacity: 0.85; overflow: hidden; }
.k5tv .k5-bartext .k5-eta { flex: none; }
.k5tv .k5-stats { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 4px; flex: none; }
.k5tv .k5-stat { background: var(--k5-panel); border-radius: 4px; padding: 3px 6px; min-width: 0; }
.k5tv .k5-stat-label { display: block; font-size: 9px; letter-spacing: 0.07em; text-transform: uppercase; color: var(--k5-muted); }
.k5tv .k5-stat-value { display: block; font-size: 12px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.k5tv .k5-stat-value.k5-bad { color: var(--k5-err); }
.k5tv .k5-chartbox { position: relative; flex: 1 1 110px; min-height: 90px; background: var(--k5-panel); border-radius: 4px; }
.k5tv .k5-chart { position: absolute; inset: 0; width: 100%; height: 100%; display: block; }
.k5tv .k5-legend { position: absolute; top: 3px; right: 6px; display: flex; gap: 8px; font-size: 10px; color: var(--k5-muted); pointer-events: none; }
.k5tv .k5-legend i { display: inline-block; width: 10px; height: 2px; margin-right: 3px; vertical-align: middle; }
.k5tv .k5-sample { display: flex; gap: 6px; align-items: stretch; height: 118px; flex: none; background: var(--k5-panel); border-radius: 4px; padding: 4px; }
.k5tv .k5-media { flex: 1 1 auto; min-width: 0; display: flex; gap: 4px; align-items: center; justify-content: center; background: rgba(0,0,0,0.35); border-radius: 3px; overflow: hidden; }
.k5tv .k5-media a { display: contents; }
.k5tv .k5-media video, .k5tv .k5-media img { max-height: 100%; max-width: 100%; min-width: 0; object-fit: contain; display: block; border-radius: 2px; }
.k5tv .k5-media .k5-empty { color: var(--k5-muted); font-size: 11px; text-align: center; padding: 0 8px; }
.k5tv .k5-sample-info { flex: 0 0 30%; min-width: 0; display: flex; flex-direction: column; justify-content: center; gap: 3px; font-size: 11px; color: var(--k5-muted); overflow: hidden; }
.k5tv .k5-sample-info b { color: var(--k5-fg); font-weight: 600; }
.k5tv .k5-sample-prompt { overflow: hidden; display: -webkit-box; -webkit-line-clamp: 4; -webkit-box-orient: vertical; word-break: break-word; }
.k5tv .k5-msg { flex: none; font-size: 11px; color: var(--k5-muted); white-space: nowrap; overflow: hidden; text-overflow: ellipsis; min-height: 14px; }
.k5tv .k5-msg[data-level="warning"] { color: var(--k5-warn); }
.k5tv .k5-msg[data-level="error"] { color: var(--k5-err); white-space: normal; max-height: 42px; overflow: auto; user-select: text; }
.k5tv .k5-foot { display: flex; align-items: center; gap: 6px; flex: none; min-height: 20px; padding: 0 2px; }
.k5tv .k5-lora-label { flex: none; font-size: 9px; letter-spacing: 0.07em; text-transform: uppercase; color: var(--k5-muted); }
.k5tv button { font: inherit; font-size: 11px; font-weight: 600; line-height: 14px; color: var(--k5-fg); background: rgba(255,255,255,0.08); border: 1px solid var(--k5-border); border-radius: 4px; padding: 1px 8px; cursor: pointer; flex: none; }
.k5tv button:hover:not(:disabled) { background: rgba(255,255,255,0.14); }
.k5tv button:disabled { opacity: 0.38; cursor: default; }
.k5tv button.k5-stop:not(:disabled) { border-color: rgba(239,91,91,0.6); color: #ff8a8a; }
.k5tv button.k5-resume:not(:disabled) { border-color: rgba(78,161,255,0.6); color: #8cc2ff; }
.k5tv .k5-lora-name { flex: 1 1 auto; min-width: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; color: var(--k5-muted); user-select: text; }
.k5tv[data-lora] .k5-lora-name { color: var(--k5-ok); font-weight: 600; }
.k5tv .k5-copy { padding: 1px 6px; font-weight: 500; }
`;

const STATUSES = new Set(["idle", "queued", "running", "stopping", "stopped", "done", "error"]);
const VIDEO_RE = /\.(mp4|webm|mov|mkv|m4v)$/i;

function ensureStyle(doc) {
  if (!doc || doc.getElementById(STYLE_ID)) return;
  const style = doc.createElement("style");
  style.id = STYLE_ID;
  style.textContent = CSS;
  (doc.head || doc.documentElement).appendChild(style);
}

function el(doc, tag, cls, text) {
  const e = doc.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

function num(x) {
  if (Array.isArray(x)) x = x[0];
  if (x === null || x === undefined || x === "") return null;
  const n = typeof x === "number" ? x : Number(x);
  return Number.isNaN(n) && typeof x !== "number" ? null : n;
}

function finite(x) {
  return typeof x === "number" && Number.isFinite(x);
}

export function formatDuration(s) {
  if (!finite(s) || s < 0) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (h > 0) return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
  if (m > 0) return `${m}:${String(sec).padStart(2, "0")}`;
  return `${sec}s`;
}

export function formatBytes(b) {
  if (!finite(b) || b < 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) {
    b /= 1024;
    i++;
  }
  return `${b >= 100 || i === 0 ? b.toFixed(0) : b.toFixed(1)} ${units[i]}`;
}

export function formatLoss(x) {
  if (x === null || x === undefined) return "–";
  if (!finite(x)) return String(x).toLowerCase();
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e-3 && a < 1e4 ? x.toPrecision(4) : x.toExponential(2);
}

export function formatLr(x) {
  if (!finite(x)) return "–";
  return x === 0 ? "0" : x.toExponential(2);
}

export function formatSpeed(itS) {
  if (!finite(itS) || itS <= 0) return "–";
  return itS >= 1 ? `${itS.toFixed(2)} it/s` : `${(1 / itS).toFixed(2)} s/it`;
}

function basename(p) {
  if (!p) return "";
  return String(p).split(/[\\/]/).pop();
}

function urlFilename(u) {
  try {
    const url = new URL(u, "http://x/");
    return url.searchParams.get("filename") || basename(url.pathname);
  } catch (_) {
    return basename(u);
  }
}

function quantile(sorted, q) {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))));
  return sorted[i];
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  const stepSize = (norm >= 5 ? 5 : norm >= 2 ? 2 : 1) * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / stepSize) * stepSize; v <= hi + stepSize * 1e-9; v += stepSize) ticks.push(v);
  return ticks;
}

function freshState() {
  return {
    status: "idle",
    run: null,
    config: null,
    step: 0,
    total: 0,
    epoch: null,
    epochs: null,
    loss: null,
    avgLoss: null,
    lr: null,
    itS: null,
    etaS: null,
    peakMem: null,
    points: [], // {step, loss, ema} for every step event with a finite loss
    nonFinite: 0, // step events whose loss was NaN/inf/null
    samples: [], // {step, urls, paths, prompts}
    checkpoints: [], // {step, path}
    loraPath: null,
    loraName: null,
    message: "",
    messageLevel: "info",
    error: null,
    eventCount: 0,
    lastEvent: null,
  };
}

export function createTrainView(root, options = {}) {
  const { onStop = null, onResume = null, resolveUrl = (u) => u } = options;
  const smoothing = finite(options.smoothing) ? Math.min(Math.max(options.smoothing, 0), 0.999) : 0.9;
  const doc = root.ownerDocument || document;
  const win = doc.defaultView || window;
  ensureStyle(doc);

  let state = freshState();
  let emaAcc = 0; // biased EMA accumulator of the last point
  let emaN = 0; // number of points folded into it
  let frame = 0;
  let destroyed = false;

  // ---- DOM ---------------------------------------------------------------------------------
  root.classList.add("k5tv");
  root.replaceChildren();

  const head = el(doc, "div", "k5-head");
  const pill = el(doc, "span", "k5-pill", "idle");
  pill.dataset.k5 = "status";
  const runEl = el(doc, "span", "k5-run", "no training run");
  runEl.dataset.k5 = "run";
  const stopBtn = el(doc, "button", "k5-stop", "■ Stop");
  stopBtn.type = "button";
  stopBtn.dataset.k5 = "stop";
  stopBtn.title = "Ask the trainer to save and stop";
  const resumeBtn = el(doc, "button", "k5-resume", "▶ Resume");
  resumeBtn.type = "button";
  resumeBtn.dataset.k5 = "resume";
  resumeBtn.title = "Queue the workflow again with resume on (continues from the last saved state)";
  head.append(pill, runEl, stopBtn, resumeBtn);

  const bar = el(doc, "div", "k5-bar");
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.dataset.k5 = "progress";
  const fill = el(doc, "div", "k5-fill");
  fill.dataset.k5 = "progress-fill";
  const barText = el(doc, "div", "k5-bartext k5-num");
  const progText = el(doc, "span", "", "– / –");
  progText.dataset.k5 = "progress-text";
  const epochEl = el(doc, "span", "k5-epoch", "");
  epochEl.dataset.k5 = "epoch";
  const etaText = el(doc, "span", "k5-eta", "");
  etaText.dataset.k5 = "eta";
  barText.append(progText, epochEl, etaText);
  bar.append(fill, barText);

  const stats = el(doc, "div", "k5-stats");
  const statEls = {};
  for (const [key, label] of [
    ["loss", "loss"],
    ["avg", "avg loss"],
    ["lr", "lr"],
    ["speed", "speed"],
    ["mem", "peak mem"],
    ["ckpt", "checkpoint"],
  ]) {
    const box = el(doc, "div", "k5-stat");
    const v = el(doc, "span", "k5-stat-value k5-num", "–");
    v.dataset.k5 = `stat-${key}`;
    box.append(el(doc, "span", "k5-stat-label", label), v);
    stats.append(box);
    statEls[key] = v;
  }

  const chartBox = el(doc, "div", "k5-chartbox");
  const canvas = el(doc, "canvas", "k5-chart");
  canvas.dataset.k5 = "chart";
  const legend = el(doc, "div", "k5-legend");
  const legRaw = el(doc, "span", "");
  const iRaw = el(doc, "i");
  iRaw.style.background = "var(--k5-raw)";
  legRaw.append(iRaw, doc.createTextNode("raw"));
  const legEma = el(doc, "span", "");
  const iEma = el(doc, "i");
  iEma.style.background = "var(--k5-ema)";
  legEma.append(iEma, doc.createTextNode(`ema ${smoothing}`));
  const legCk = el(doc, "span", "", "▲ ckpt");
  legCk.style.color = "var(--k5-ok)";
  const legSm = el(doc, "span", "", "▲ sample");
  legSm.style.color = "var(--k5-accent)";
  legend.append(legRaw, legEma, legCk, legSm);
  chartBox.append(canvas, legend);

  const sample = el(doc, "div", "k5-sample");
  sample.dataset.k5 = "sample";
  const media = el(doc, "div", "k5-media");
  media.dataset.k5 = "sample-media";
  const sampleInfo = el(doc, "div", "k5-sample-info");
  sample.append(media, sampleInfo);

  const msg = el(doc, "div", "k5-msg", "");
  msg.dataset.k5 = "message";

  const foot = el(doc, "div", "k5-foot");
  const loraLabel = el(doc, "span", "k5-lora-label", "LoRA");
  const loraName = el(doc, "span", "k5-lora-name", "–");
  loraName.dataset.k5 = "lora";
  const copyBtn = el(doc, "button", "k5-copy", "copy");
  copyBtn.type = "button";
  copyBtn.title = "Copy the LoRA file name (for a LoRA loader)";
  copyBtn.hidden = true;
  foot.append(loraLabel, loraName, copyBtn);

  root.append(head, bar, stats, chartBox, sample, msg, foot);

  // Keep pointer/wheel interaction on buttons local; everything else belongs to the canvas graph.
  for (const b of [stopBtn, resumeBtn, copyBtn]) b.addEventListener("pointerdown", (e) => e.stopPropagation());

  stopBtn.addEventListener("click", async () => {
    if (!onStop || state.status !== "running") return;
    const prev = state.status;
    setStatus("stopping", "stop requested – waiting for the trainer to save and exit…");
    try {
      await onStop(state.run);
    } catch (err) {
      if (state.status === "stopping") setStatus(prev, `stop failed: ${err?.message || err}`, "error");
    }
  });

  resumeBtn.addEventListener("click", async () => {
    if (!onResume || !canResume()) return;
    const prev = state.status;
    setStatus("queued", "resume queued – waiting for the trainer to start…");
    try {
      await onResume(state.run);
    } catch (err) {
      if (state.status === "queued") setStatus(prev, `resume failed: ${err?.message || err}`, "error");
    }
  });

  copyBtn.addEventListener("click", async () => {
    const text = state.loraName || "";
    try {
      await win.navigator.clipboard.writeText(text);
      copyBtn.textContent = "copied";
    } catch (_) {
      copyBtn.textContent = "copy failed";
    }
    win.setTimeout(() => (copyBtn.textContent = "copy"), 1200);
  });

  let resizeObs = null;
  if (win.ResizeObserver) {
    resizeObs = new win.ResizeObserver(() => schedule());
    resizeObs.observe(chartBox);
  }

  // ---- state updates -------------------------------------------------------------------------
  function canResume() {
    return state.status === "stopped" || state.status === "error";
  }

  function setMessage(text, level = "info") {
    state.message = text || "";
    state.messageLevel = level;
  }

  function setStatus(status, message, level) {
    if (!STATUSES.has(status)) throw new Error(`unknown status ${status}`);
    state.status = status;
    if (message !== undefined) setMessage(message, level || (status === "error" ? "error" : "info"));
    render();
  }

  function addPoint(step, loss) {
    // A step at or before the last recorded one (a replay after reload, or a resume from an earlier
    // checkpoint) replaces everything from that step on, so replays are idempotent.
    const pts = state.points;
    if (pts.length && pts[pts.length - 1].step >= step) {
      while (pts.length && pts[pts.length - 1].step >= step) pts.pop();
      emaN = pts.length;
      emaAcc = pts.length ? pts[pts.length - 1]._acc : 0;
    }
    if (!finite(loss)) {
      state.nonFinite++;
      return;
    }
    emaAcc = emaN === 0 ? (1 - smoothing) * loss : smoothing * emaAcc + (1 - smoothing) * loss;
    emaN++;
    const ema = emaAcc / (1 - Math.pow(smoothing, emaN)); // debiased
    pts.push({ step, loss, ema, _acc: emaAcc });
  }

  function handle(event) {
    if (destroyed || event == null) return;
    if (typeof event === "string") {
      const line = event.trim();
      if (!line) return;
      try {
        event = JSON.parse(line);
      } catch (err) {
        console.warn("[k5-train] bad event line", line);
        return;
      }
    }
    try {
      apply(event);
    } catch (err) {
      console.error("[k5-train] failed to handle event", event, err);
    }
    render();
  }

  function apply(ev) {
    state.eventCount++;
    state.lastEvent = ev;
    if (ev.run && ev.event !== "start") state.run = state.run || ev.run;
    switch (ev.event) {
      case "start": {
        // Same run and we already have its steps: a resume, keep the history (later steps
        // overwrite from the resume point). Otherwise a new run: start from a clean state.
        const continuing = !!ev.run && ev.run === state.run && state.step > 0;
        if (!continuing) {
          const keep = state.eventCount;
          state = freshState();
          emaAcc = 0;
          emaN = 0;
          state.eventCount = keep;
          state.lastEvent = ev;
          renderSample(null);
        }
        state.run = ev.run || state.run;
        state.config = ev.config || state.config;
        if (finite(num(ev.total))) state.total = num(ev.total);
        const cfg = state.config || {};
        const epochs = num(ev.epochs ?? cfg.max_train_epochs ?? cfg.epochs);
        if (finite(epochs)) state.epochs = epochs;
        const from = num(ev.step ?? ev.resume_step);
        if (finite(from) && from > 0) state.step = from;
        state.status = "running";
        state.error = null;
        state.loraPath = null;
        state.loraName = null;
        setMessage(continuing || (finite(from) && from > 0) ? `resumed at step ${state.step}` : "training started");
        break;
      }
      case "step": {
        const step = num(ev.step);
        if (!finite(step)) break;
        if (state.status !== "stopping") state.status = "running";
        state.step = step;
        if (finite(num(ev.total))) state.total = num(ev.total);
        if (finite(num(ev.epoch))) state.epoch = num(ev.epoch);
        if (finite(num(ev.epochs))) state.epochs = num(ev.epochs);
        const loss = num(ev.loss);
        state.loss = loss === null ? NaN : loss; // the trainer writes non-finite numbers as null
        state.avgLoss = num(ev.avg_loss);
        state.lr = num(ev.lr);
        state.itS = num(ev.it_s);
        state.etaS = num(ev.eta_s);
        const mem = num(ev.peak_mem);
        if (finite(mem)) state.peakMem = Math.max(state.peakMem || 0, mem);
        addPoint(step, loss);
        if (state.messageLevel === "error" && state.status === "running") setMessage("");
        break;
      }
      case "epoch": {
        if (finite(num(ev.epoch))) state.epoch = num(ev.epoch);
        const avg = num(ev.avg_loss);
        setMessage(`epoch ${ev.epoch ?? "?"} finished${finite(avg) ? ` · avg loss ${formatLoss(avg)}` : ""}`);
        break;
      }
      case "sample": {
        const s = {
          step: num(ev.step),
          urls: Array.isArray(ev.urls) ? ev.urls.filter(Boolean) : [],
          paths: Array.isArray(ev.paths) ? ev.paths.filter(Boolean) : [],
          prompts: Array.isArray(ev.prompts) ? ev.prompts : ev.prompt ? [ev.prompt] : [],
        };
        state.samples.push(s);
        renderSample(s);
        setMessage(`sample saved at step ${s.step ?? "?"}`);
        break;
      }
      case "checkpoint": {
        const c = { step: num(ev.step), path: ev.path || null };
        state.checkpoints.push(c);
        setMessage(`checkpoint saved${finite(c.step) ? ` at step ${c.step}` : ""}: ${basename(c.path)}`);
        break;
      }
      case "log": {
        if (ev.message) setMessage(String(ev.message), ev.level === "warning" ? "warning" : "info");
        break;
      }
      case "error": {
        state.status = "error";
        state.error = String(ev.message || "training failed");
        setMessage(state.error, "error");
        break;
      }
      case "stopped": {
        state.status = "stopped";
        setMessage(ev.message ? String(ev.message) : `stopped at step ${state.step}`);
        break;
      }
      case "done": {
        const stopped = !!(ev.stopped || ev.interrupted);
        state.loraPath = ev.lora_path || null;
        state.loraName = ev.lora_name || basename(ev.lora_path) || null;
        if (finite(num(ev.step))) state.step = num(ev.step);
        if (stopped) {
          state.status = "stopped";
          setMessage(`stopped at step ${state.step}${state.loraName ? " · LoRA saved" : ""}`);
        } else {
          state.status = "done";
          if (state.total && state.step < state.total) state.step = state.total;
          state.etaS = 0;
          setMessage(`finished · ${state.loraPath || state.loraName || ""}`);
        }
        break;
      }
      default:
        break; // unknown events are counted but otherwise ignored
    }
  }

  // ---- rendering -----------------------------------------------------------------------------
  function renderSample(s) {
    media.replaceChildren();
    sampleInfo.replaceChildren();
    if (!s) {
      media.append(el(doc, "div", "k5-empty", "no sample yet"));
      sampleInfo.append(el(doc, "span", "", "samples appear here while training"));
      return;
    }
    const urls = s.urls.slice(0, 4);
    if (!urls.length) {
      media.append(el(doc, "div", "k5-empty", s.paths.map(basename).join(", ") || "sample without preview"));
    }
    for (const u of urls) {
      const src = resolveUrl(u);
      const link = el(doc, "a");
      link.href = src;
      link.target = "_blank";
      link.rel = "noopener";
      let m;
      if (VIDEO_RE.test(urlFilename(u))) {
        m = el(doc, "video");
        m.muted = true;
        m.defaultMuted = true;
        m.loop = true;
        m.autoplay = true;
        m.playsInline = true;
        m.setAttribute("muted", "");
        m.preload = "auto";
      } else {
        m = el(doc, "img");
        m.alt = urlFilename(u);
        m.decoding = "async";
      }
      m.src = src;
      m.dataset.k5 = "sample-item";
      link.append(m);
      media.append(link);
    }
    const title = el(doc, "span");
    title.append(doc.createTextNode("sample · step "), el(doc, "b", "k5-num", s.step ?? "?"));
    sampleInfo.append(title);
    const name = s.paths[0] ? basename(s.paths[0]) : urls[0] ? urlFilename(urls[0]) : "";
    if (name) {
      const n = el(doc, "span", "k5-num", name);
      n.title = s.paths[0] || name;
      n.style.overflow = "hidden";
      n.style.textOverflow = "ellipsis";
      n.style.whiteSpace = "nowrap";
      sampleInfo.append(n);
    }
    if (s.prompts.length) {
      const p = el(doc, "span", "k5-sample-prompt", `“${s.prompts[0]}”`);
      p.title = s.prompts.join("\n");
      sampleInfo.append(p);
    }
    if (state.samples.length > 1) sampleInfo.append(el(doc, "span", "", `${state.samples.length} samples so far`));
  }

  function render() {
    const st = state;
    root.dataset.status = st.status;
    root.dataset.step = String(st.step);
    root.dataset.total = String(st.total);
    root.dataset.points = String(st.points.length);
    root.dataset.samples = String(st.samples.length);
    root.dataset.checkpoints = String(st.checkpoints.length);
    root.dataset.events = String(st.eventCount);
    if (st.loraName) root.dataset.lora = st.loraName;
    else delete root.dataset.lora;
    canvas.dataset.points = String(st.points.length);
    const lastPt = st.points[st.points.length - 1];
    canvas.dataset.lastLoss = lastPt ? String(lastPt.loss) : "";
    canvas.dataset.lastEma = lastPt ? String(lastPt.ema) : "";

    pill.textContent = st.status;
    runEl.textContent = st.run || "no training run";
    runEl.title = st.config ? JSON.stringify(st.config, null, 1) : st.run || "";
    epochEl.textContent = finite(st.epoch) ? `epoch ${st.epoch}${finite(st.epochs) ? ` / ${st.epochs}` : ""}` : "";

    const frac = st.total > 0 ? Math.min(1, Math.max(0, st.step / st.total)) : 0;
    fill.style.width = `${(frac * 100).toFixed(2)}%`;
    bar.setAttribute("aria-valuenow", String(st.step));
    bar.setAttribute("aria-valuemax", String(st.total));
    progText.textContent = st.total > 0 ? `${st.step} / ${st.total} · ${Math.floor(frac * 100)}%` : st.step ? `step ${st.step}` : "– / –";
    etaText.textContent =
      st.status === "done" ? "done" : st.status === "running" && finite(st.etaS) ? `ETA ${formatDuration(st.etaS)}` : "";

    statEls.loss.textContent = formatLoss(st.loss);
    statEls.loss.classList.toggle("k5-bad", st.loss !== null && !finite(st.loss));
    statEls.avg.textContent = formatLoss(st.avgLoss);
    statEls.lr.textContent = formatLr(st.lr);
    statEls.speed.textContent = formatSpeed(st.itS);
    statEls.mem.textContent = formatBytes(st.peakMem);
    const ck = st.checkpoints[st.checkpoints.length - 1];
    statEls.ckpt.textContent = ck ? (finite(ck.step) ? `step ${ck.step}` : "saved") : "–";
    statEls.ckpt.title = ck?.path || "";

    msg.textContent = st.message;
    msg.dataset.level = st.messageLevel;
    msg.title = st.message;

    stopBtn.disabled = !onStop || st.status !== "running";
    resumeBtn.disabled = !onResume || !canResume();
    loraName.textContent = st.loraName || "–";
    loraName.title = st.loraPath || "";
    copyBtn.hidden = !st.loraName;
    schedule();
  }

  function schedule() {
    if (frame || destroyed) return;
    const raf = win.requestAnimationFrame ? win.requestAnimationFrame.bind(win) : (f) => win.setTimeout(f, 16);
    frame = raf(() => {
      frame = 0;
      drawChart();
    });
  }

  function drawChart() {
    if (destroyed) return;
    const w = Math.round(canvas.clientWidth);
    const h = Math.round(canvas.clientHeight);
    if (w < 10 || h < 10) return; // hidden (node collapsed, zoomed out, offscreen)
    const dpr = win.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const cs = win.getComputedStyle(root);
    const color = (name, fallback) => cs.getPropertyValue(name).trim() || fallback;
    const cRaw = color("--k5-raw", "rgba(140,170,210,0.45)");
    const cEma = color("--k5-ema", "#ffb347");
    const cGrid = color("--k5-grid", "rgba(255,255,255,0.08)");
    const cMuted = color("--k5-muted", "#999");
    const cOk = color("--k5-ok", "#4cc38a");
    const font = `10px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace`;
    ctx.font = font;

    const pts = state.points;
    if (!pts.length) {
      ctx.fillStyle = cMuted;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(state.nonFinite ? "loss is not finite" : "loss chart · waiting for the first step", w / 2, h / 2);
      return;
    }

    // y range: robust to early spikes (2%..98% of raw, always covering the EMA curve)
    const sorted = pts.map((p) => p.loss).sort((a, b) => a - b);
    let lo = Math.min(quantile(sorted, 0.02), ...pts.map((p) => p.ema));
    let hi = Math.max(quantile(sorted, 0.98), ...pts.map((p) => p.ema));
    if (pts.length < 20) {
      lo = sorted[0];
      hi = sorted[sorted.length - 1];
    }
    if (!(hi > lo)) {
      const d = Math.abs(hi) * 0.1 || 0.1;
      lo -= d;
      hi += d;
    }
    const padY = (hi - lo) * 0.08;
    lo -= padY;
    hi += padY;
    if (sorted[0] >= 0 && lo < 0) lo = 0;

    const ticks = niceTicks(lo, hi, 3);
    const tickStep = ticks.length > 1 ? ticks[1] - ticks[0] : Math.abs(hi - lo) || 1;
    const decimals = Math.min(8, Math.max(0, -Math.floor(Math.log10(tickStep) + 1e-9)));
    const labels = ticks.map((t) => (tickStep < 1e-4 || Math.abs(t) >= 1e4 ? t.toExponential(1) : t.toFixed(decimals)));
    const left = Math.ceil(Math.max(...labels.map((l) => ctx.measureText(l).width))) + 10;
    const right = 8;
    const top = 16;
    const bottom = 15;
    const pw = Math.max(1, w - left - right);
    const ph = Math.max(1, h - top - bottom);
    const firstStep = Math.min(pts[0].step, 0);
    const lastStep = Math.max(state.total || 0, pts[pts.length - 1].step, firstStep + 1);
    const X = (s) => left + ((s - firstStep) / (lastStep - firstStep)) * pw;
    const Y = (v) => top + (1 - (Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo)) * ph;

    // grid + labels
    ctx.lineWidth = 1;
    ctx.strokeStyle = cGrid;
    ctx.fillStyle = cMuted;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ticks.forEach((t, i) => {
      const y = Math.round(Y(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(w - right, y);
      ctx.stroke();
      ctx.fillText(labels[i], left - 5, y);
    });
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText("loss", 4, 11);
    ctx.textAlign = "right";
    ctx.fillText(`step ${lastStep}`, w - right, h - 3);
    ctx.textAlign = "left";
    ctx.fillText(String(firstStep), left, h - 3);

    // checkpoints (green ticks) and samples (accent ticks) along the bottom axis
    const axisY = top + ph;
    ctx.strokeStyle = cGrid;
    ctx.beginPath();
    ctx.moveTo(left, axisY + 0.5);
    ctx.lineTo(w - right, axisY + 0.5);
    ctx.stroke();
    const marks = (list, col, dy) => {
      ctx.fillStyle = col;
      for (const m of list) {
        if (!finite(m.step)) continue;
        const x = X(m.step);
        ctx.beginPath();
        ctx.moveTo(x, axisY + dy);
        ctx.lineTo(x - 3, axisY + dy + 4);
        ctx.lineTo(x + 3, axisY + dy + 4);
        ctx.closePath();
        ctx.fill();
      }
    };
    marks(state.checkpoints, cOk, 1);
    marks(state.samples, color("--k5-accent", "#4ea1ff"), 1);

    // progress cursor
    if (state.status === "running" || state.status === "stopping") {
      const x = Math.round(X(state.step)) + 0.5;
      ctx.strokeStyle = cGrid;
      ctx.setLineDash([2, 3]);
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, axisY);
      ctx.stroke();
      ctx.setLineDash([]);
    }

    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top - 2, pw, ph + 4);
    ctx.clip();
    ctx.lineJoin = "round";
    ctx.lineCap = "round";
    if (pts.length > pw * 1.5) {
      // dense: one min-max bar of raw loss per pixel column, EMA through column means
      const cols = new Map();
      for (const p of pts) {
        const c = Math.floor(X(p.step));
        const e = cols.get(c);
        if (!e) cols.set(c, { min: p.loss, max: p.loss, ema: p.ema });
        else {
          if (p.loss < e.min) e.min = p.loss;
          if (p.loss > e.max) e.max = p.loss;
          e.ema = p.ema;
        }
      }
      ctx.strokeStyle = cRaw;
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (const [c, e] of cols) {
        ctx.moveTo(c + 0.5, Y(e.min));
        ctx.lineTo(c + 0.5, Y(e.max) - 0.01);
      }
      ctx.stroke();
      ctx.strokeStyle = cEma;
      ctx.lineWidth = 2;
      ctx.beginPath();
      let first = true;
      for (const [c, e] of cols) {
        if (first) ctx.moveTo(c + 0.5, Y(e.ema));
        else ctx.lineTo(c + 0.5, Y(e.ema));
        first = false;
      }
      ctx.stroke();
    } else {
      ctx.strokeStyle = cRaw;
      ctx.lineWidth = 1;
      ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.loss)) : ctx.moveTo(X(p.step), Y(p.loss))));
      ctx.stroke();
      if (pts.length <= pw / 4) {
        ctx.fillStyle = cRaw;
        for (const p of pts) {
          ctx.beginPath();
          ctx.arc(X(p.step), Y(p.loss), 1.6, 0, Math.PI * 2);
          ctx.fill();
        }
      }
      ctx.strokeStyle = cEma;
      ctx.lineWidth = 2;
      ctx.beginPath();
      pts.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.ema)) : ctx.moveTo(X(p.step), Y(p.ema))));
      ctx.stroke();
    }
    // last point
    const lp = pts[pts.length - 1];
    ctx.fillStyle = cEma;
    ctx.beginPath();
    ctx.arc(X(lp.step), Y(lp.ema), 2.8, 0, Math.PI * 2);
    ctx.fill();
    ctx.restore();
  }

  // ---- public API ----------------------------------------------------------------------------
  function reset() {
    state = freshState();
    emaAcc = 0;
    emaN = 0;
    renderSample(null);
    render();
  }

  function replay(events) {
    for (const e of events || []) {
      if (destroyed) return;
      try {
        if (typeof e === "string") {
          if (e.trim()) apply(JSON.parse(e));
        } else if (e) apply(e);
      } catch (err) {
        console.warn("[k5-train] skipped event", e, err);
      }
    }
    const lastSample = state.samples[state.samples.length - 1];
    renderSample(lastSample || null);
    render();
  }

  function redraw() {
    if (frame) {
      (win.cancelAnimationFrame || win.clearTimeout).call(win, frame);
      frame = 0;
    }
    drawChart();
  }

  function destroy() {
    destroyed = true;
    resizeObs?.disconnect();
    if (frame) (win.cancelAnimationFrame || win.clearTimeout).call(win, frame);
  }

  reset();

  return {
    handle,
    replay,
    reset,
    setStatus,
    redraw,
    destroy,
    element: root,
    get state() {
      return state;
    },
  };
}
