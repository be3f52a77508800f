// comfy-pipefusion: shows the worker group's state (starting, loading, ready, busy, failed, stopped) as a
// badge on PipeFusion nodes. The badge goes through the frontend's own API: node.badges holds LGraphBadge
// instances or functions returning one (frontends 1.25 … 1.32 expose the class as window.LGraphBadge).
// Without that API the state is drawn in the node's foreground instead. Every handler catches and logs:
// a failure here must never stop the canvas from drawing.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "comfy-pipefusion.status";
const EVENT = "pipefusion.status";
const COLORS = { starting: "#a86f00", loading: "#6a1b9a", ready: "#2e7d32", busy: "#1565c0", failed: "#c62828",
  stopped: "#555555" };
const TYPES = new Set(["PipeFusionDiTLoader", "PipeFusionKSampler", "PipeFusionUnload", "PipeFusionLoRA",
  "PipeFusionParallelize"]);
const MAX_TEXT = 64;

function warn(what, err) {
  try {
    console.warn(`[comfy-pipefusion] ${what} failed; the canvas goes on without it:`, err);
  } catch {
    // nothing left to do
  }
}

// Wraps a handler so that an exception is logged, never thrown into the frontend.
function guarded(what, fn, fallback = undefined) {
  return function (...args) {
    try {
      return fn.apply(this, args);
    } catch (err) {
      warn(what, err);
      return fallback;
    }
  };
}

// The loader a node's PIPEFUSION_MODEL comes from, through any chain of PipeFusion LoRA nodes.
function loaderOf(node) {
  let n = node;
  for (let hops = 0; n && hops < 64; hops++) {
    if (n.comfyClass === "PipeFusionDiTLoader") return n;
    n = n === node || n.comfyClass === "PipeFusionLoRA" ? n.getInputNode?.(0) : null;
  }
  return null;
}

// The state of the group a node works with: its loader's checkpoint and strategy name the group (the
// group key is "<unet_name>|<strategy>|<dtype>", nodes/loader.py); else (the MODEL path's Parallelize
// node, whose group is named by the model object) the last state heard.
function stateOf(node, status) {
  const loader = loaderOf(node);
  const widget = (name) => loader?.widgets?.find((w) => w.name === name)?.value;
  if (loader?.comfyClass === "PipeFusionDiTLoader" && status.groups.size) {
    const prefix = `${widget("unet_name")}|${widget("strategy")}|`;
    for (const [key, value] of status.groups) if (key.startsWith(prefix)) return value;
  }
  return status;
}

// A group that ended after a failure is "stopped" with the reason "failed: …": it keeps the failure's colour.
function colorOf(status) {
  const failed = status.state === "stopped" && status.detail?.startsWith("failed");
  return COLORS[failed ? "failed" : status.state] ?? "#555555";
}

function badgeText(status) {
  if (!status.state) return "";
  const text = `PipeFusion: ${status.state}${status.detail ? " · " + status.detail : ""}`;
  return text.length > MAX_TEXT ? text.slice(0, MAX_TEXT - 1) + "…" : text;
}

const NO_BADGE = { visible: false, height: 0, getWidth: () => 0, draw: () => {} };

// The function node.badges calls at every draw: a fresh LGraphBadge for the current state.
function badgeFactory(node, status) {
  const Badge = window.LGraphBadge;
  return guarded("the PipeFusion badge", () => {
    const own = stateOf(node, status);
    return new Badge({ text: badgeText(own), bgColor: colorOf(own), fgColor: "#ffffff" });
  }, NO_BADGE);
}

// Frontends without node badges: the same pill, drawn above the title by the node itself.
function drawFallback(node, status) {
  const before = node.onDrawForeground;
  node.onDrawForeground = function (ctx, ...rest) {
    const out = before?.apply(this, [ctx, ...rest]);
    guarded("drawing the PipeFusion state", () => {
      const own = stateOf(this, status);
      const text = badgeText(own);
      if (!text || this.flags?.collapsed) return;
      const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      ctx.save();
      ctx.font = "12px sans-serif";
      const w = ctx.measureText(text).width + 12;
      ctx.fillStyle = colorOf(own);
      ctx.fillRect(this.size[0] - w, -title - 22, w, 20);
      ctx.fillStyle = "#ffffff";
      ctx.textBaseline = "middle";
      ctx.fillText(text, this.size[0] - w + 6, -title - 12);
      ctx.restore();
    })();
    return out;
  };
}

function attach(node, status) {
  if (!TYPES.has(node?.comfyClass ?? node?.type) || node.pipefusionBadge) return;
  if (typeof window.LGraphBadge === "function" && Array.isArray(node.badges)) {
    node.pipefusionBadge = badgeFactory(node, status);
    node.badges.push(node.pipefusionBadge);
  } else {
    node.pipefusionBadge = "foreground";
    drawFallback(node, status);
  }
}

function show(status, detail) {
  status.state = String(detail?.state ?? "");
  status.detail = String(detail?.detail ?? "");
  if (detail?.group) {
    if (status.state === "stopped") status.groups.delete(detail.group);
    else status.groups.set(detail.group, { state: status.state, detail: status.detail });
  }
  for (const node of app.graph?._nodes ?? []) {
    if (!TYPES.has(node.comfyClass ?? node.type)) continue;
    attach(node, status);
    node.boxcolor = colorOf(stateOf(node, status));
  }
  app.graph?.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: EXTENSION,
  // The last state heard, and each group's (by key), read by every badge; one object per page.
  status: { state: "", detail: "", groups: new Map() },
  setup: guarded("setting up the PipeFusion status", function () {
    const status = this.status;
    api.addEventListener(EVENT, guarded("the PipeFusion status event", (event) => show(status, event.detail)));
  }),
  nodeCreated: guarded("adding the PipeFusion badge", function (node) {
    attach(node, this.status);
  }),
  loadedGraphNode: guarded("adding the PipeFusion badge", function (node) {
    attach(node, this.status);
  }),
});
