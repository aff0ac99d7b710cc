// Minimal stand-in for ComfyUI's scripts/api.js: an EventTarget with fetchApi/apiURL.
// Routes are canned by the test page in api.routes; every call is recorded in api.calls.
class MockApi extends EventTarget {
  constructor() {
    super();
    this.calls = [];
    this.routes = {};
    this.registered = new Set();
  }
  addEventListener(type, cb, opts) {
    super.addEventListener(type, cb, opts);
    this.registered.add(type);
  }
  apiURL(route) {
    return "/api" + route;
  }
  async fetchApi(route, options = {}) {
    this.calls.push({ route, method: options.method || "GET", body: options.body ?? null });
    const h = this.routes[route];
    if (h === undefined) return new Response("not found", { status: 404 });
    const value = typeof h === "function" ? await h(options) : h;
    return new Response(JSON.stringify(value), { status: 200, headers: { "Content-Type": "application/json" } });
  }
  // What ComfyUI does with a websocket message {"type": t, "data": d} of a registered type.
  dispatchCustomEvent(type, detail) {
    return this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
export const api = new MockApi();
