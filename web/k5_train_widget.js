// ComfyUI extension: live training widget on the "K5 Train LoRA" node (node type K5TrainLoRA).
//
// Server contract (Python side, nodes/train + routes):
//   websocket  PromptServer.instance.send_sync("k5.train", {...trainer event, "node": "<node id>", "run": "<run>"})
//   GET  /k5/train/status -> {"running": bool, "run": str|null, "node": str|null, "events": [...], "last": {...}|null}
//   POST /k5/train/stop   <- {"run": str}  -> {"ok": true}
// Routes are called through api.fetchApi (which prefixes /api, as ComfyUI mirrors every route there).
// Resume sets the node's "resume" widget to true and queues the workflow (app.queuePrompt(0)).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { createTrainView } from "./k5_train_view.js";

const NODE_TYPE = "K5TrainLoRA";
const EVENT = "k5.train";
const WIDGET_NAME = "k5_train_progress";
const MIN_WIDTH = 400;
const MIN_HEIGHT = 440;

/** @type {Set<{node: any, view: ReturnType<typeof createTrainView>}>} */
const entries = new Set();
let lastStatus = null;
let lastStatusAt = 0;
const STATUS_FRESH_MS = 3000;

/** The Train node an event or status belongs to. `fallback`: with a single Train node in the graph,
 * use it when no id matches (e.g. the workflow was reloaded and its nodes got new ids). */
function findEntry(nodeId, fallback = true) {
  if (!entries.size) return null;
  if (nodeId !== undefined && nodeId !== null) {
    const id = String(nodeId);
    for (const e of entries) if (String(e.node.id) === id) return e;
    // Nodes inside a subgraph report an execution id such as "12:34"; the node itself has id 34.
    const tail = id.includes(":") ? id.split(":").pop() : null;
    if (tail) for (const e of entries) if (String(e.node.id) === tail) return e;
  }
  return fallback && entries.size === 1 ? entries.values().next().value : null;
}

async function stopRun(run) {
  const res = await api.fetchApi("/k5/train/stop", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: run ?? null }),
  });
  let body = null;
  try {
    body = await res.json();
  } catch (_) {
    body = null;
  }
  if (!res.ok || (body && body.ok === false)) {
    throw new Error(body?.error || body?.message || `HTTP ${res.status}`);
  }
  return body;
}

async function resumeRun(node) {
  const w = node.widgets?.find((x) => x.name === "resume");
  if (w) {
    w.value = true;
    try {
      w.callback?.(w.value, app.canvas, node);
    } catch (err) {
      console.warn("[k5-train] resume widget callback failed", err);
    }
    node.setDirtyCanvas?.(true, true);
  } else {
    console.warn(`[k5-train] node ${node.id} has no "resume" widget; queueing without it`);
  }
  await app.queuePrompt(0);
}

function viewUrl(u) {
  // Sample urls come as "/view?filename=...&subfolder=...&type=output"; route them through the API base.
  if (typeof u === "string" && u.startsWith("/") && !u.startsWith("//")) {
    return api.apiURL ? api.apiURL(u) : u;
  }
  return u;
}

function latestStep(events) {
  let s = -1;
  for (const e of events) if (e && e.event === "step" && typeof e.step === "number") s = Math.max(s, e.step);
  return s;
}

function applyStatus(status, entry) {
  if (!status || !entry) return;
  const events = Array.isArray(status.events) ? status.events.slice() : [];
  const last = status.last;
  if (last && !events.some((e) => e === last || JSON.stringify(e) === JSON.stringify(last))) events.push(last);
  if (!events.length && !status.running) return;
  const view = entry.view;
  // Live events that arrived after the snapshot are newer: keep them.
  if (view.state.eventCount > 0 && latestStep(events) < view.state.step) return;
  view.reset();
  view.replay(events.map((e) => ({ ...e, run: e.run ?? status.run })));
  if (status.run && !view.state.run) view.state.run = status.run;
  const st = view.state.status;
  if (status.running && (st === "idle" || st === "stopped")) {
    view.setStatus("running");
  } else if (!status.running && (st === "running" || st === "stopping" || st === "queued")) {
    view.setStatus("stopped", `trainer not running (last step ${view.state.step})`);
  }
}

async function fetchStatus() {
  try {
    const res = await api.fetchApi("/k5/train/status");
    if (!res.ok) return null;
    lastStatus = await res.json();
    lastStatusAt = Date.now();
    // A finished run is shown again only on its own node; a running one also on a lone Train node.
    if (lastStatus && (lastStatus.run || lastStatus.running)) {
      applyStatus(lastStatus, findEntry(lastStatus.node, !!lastStatus.running));
    }
    return lastStatus;
  } catch (err) {
    console.warn("[k5-train] status route unavailable", err);
    return null;
  }
}

function onTrainEvent(e) {
  const payload = e?.detail;
  if (!payload || typeof payload !== "object") return;
  const entry = findEntry(payload.node);
  if (entry) entry.view.handle(payload);
}

function onExecutionEnd(kind) {
  return (e) => {
    const d = e?.detail;
    if (!d || (d.node_type && d.node_type !== NODE_TYPE)) return;
    const entry = d.node_id != null ? findEntry(d.node_id) : null;
    if (!entry) return;
    const st = entry.view.state.status;
    if (st !== "running" && st !== "stopping" && st !== "queued") return;
    if (kind === "error") entry.view.setStatus("error", String(d.exception_message || "execution error"));
    else entry.view.setStatus("stopped", "interrupted");
  };
}

function attach(node) {
  const root = document.createElement("div");
  const view = createTrainView(root, {
    onStop: (run) => stopRun(run ?? view.state.run),
    onResume: () => resumeRun(node),
    resolveUrl: viewUrl,
  });
  const widget = node.addDOMWidget(WIDGET_NAME, "k5_train", root, {
    serialize: false, // display only: nothing goes into the prompt or the saved workflow
    hideOnZoom: true,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => MIN_HEIGHT,
  });
  widget.serialize = false;
  const entry = { node, view, widget };
  entries.add(entry);

  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    entries.delete(entry);
    view.destroy();
    return onRemoved?.apply(this, arguments);
  };

  const size = node.computeSize?.() || node.size;
  node.setSize?.([Math.max(size[0], node.size?.[0] ?? 0, MIN_WIDTH), Math.max(size[1], node.size?.[1] ?? 0)]);

  // A loaded workflow gives the node its saved id after onNodeCreated: restore on the next tick,
  // from the status fetched at setup when it is fresh, else from a new one.
  setTimeout(() => {
    if (!entries.has(entry)) return;
    if (lastStatus && Date.now() - lastStatusAt < STATUS_FRESH_MS) {
      if (findEntry(lastStatus.node, !!lastStatus.running) === entry) applyStatus(lastStatus, entry);
    } else {
      fetchStatus();
    }
  }, 0);
  return entry;
}

app.registerExtension({
  name: "k5.TrainLoRA.Widget",

  // Listen from init, before the socket can deliver training events: the frontend drops (and
  // warns about) messages of a type nobody has registered yet, e.g. on a reload mid-run.
  init() {
    api.addEventListener(EVENT, onTrainEvent);
    api.addEventListener("execution_error", onExecutionEnd("error"));
    api.addEventListener("execution_interrupted", onExecutionEnd("interrupted"));
    api.addEventListener("reconnected", () => fetchStatus());
  },

  async setup() {
    await fetchStatus();
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      try {
        attach(this);
      } catch (err) {
        console.error("[k5-train] could not add the training widget", err);
      }
      return r;
    };
  },
});

// For tests and debugging from the browser console.
export const _k5TrainWidget = { entries, findEntry, applyStatus, fetchStatus };
