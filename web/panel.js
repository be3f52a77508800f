// comfy-pipefusion: a "PipeFusion" tab in ComfyUI's sidebar listing the warm worker groups: plan, devices,
// memory per rank, state, and the last job's time split. Data: GET /pipefusion/groups, read when the tab
// opens, on every pipefusion.status event, and every few seconds while the tab is shown.
// Every handler catches and logs: a failure here must never break the page.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/pipefusion/groups";
const REFRESH_MS = 3000;
const COLORS = { starting: "#a86f00", loading: "#6a1b9a", ready: "#2e7d32", busy: "#1565c0", failed: "#c62828",
  stopped: "#555555" };

function warn(what, err) {
  try {
    console.warn(`[comfy-pipefusion] ${what} failed:`, err);
  } catch {
    // nothing left to do
  }
}

function bytes(n) {
  if (typeof n !== "number") return "?";
  return n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : `${(n / 2 ** 20).toFixed(0)} MiB`;
}

function seconds(s) {
  return typeof s === "number" ? `${s.toFixed(2)} s` : "–";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// The group's key is "<checkpoint>|<strategy>|<dtype>" (nodes/loader.py).
function plan(group) {
  const [checkpoint, strategy, dtype] = String(group.key ?? "").split("|");
  return { checkpoint: checkpoint || "?", strategy: strategy || "?", dtype: dtype || "?" };
}

function row(label, value) {
  return el("tr", {}, el("td", { style: { opacity: "0.7", paddingRight: "8px", whiteSpace: "nowrap" } }, label),
    el("td", { style: { wordBreak: "break-word" } }, value));
}

function groupCard(group) {
  const p = plan(group);
  const devices = Array.isArray(group.devices) ? `GPU ${group.devices.join(", ")}`
    : `${group.devices} (${group.world_size} ranks)`;
  const memory = (group.rss_bytes_per_rank ?? []).map((b, r) => `rank ${r}: ${bytes(b)}`).join(", ") || "–";
  const job = group.last_job;
  const split = job
    ? `${seconds(job.wall_s)} total: compute ${seconds(job.compute_s)}, waiting ${seconds(job.wait_s)}, ` +
      `transfer ${seconds(job.transfer_s)}`
    : "no job yet";
  const state = el("span", { "data-pf": "state", style: { background: COLORS[group.state] ?? "#555", color: "#fff",
    borderRadius: "4px", padding: "1px 6px" } }, group.state ?? "?");
  return el("div", { "data-pf": "group", style: { border: "1px solid var(--border-color, #444)",
    borderRadius: "6px", padding: "8px", margin: "8px 0" } },
    el("div", { style: { fontWeight: "bold", marginBottom: "4px", wordBreak: "break-all" } }, p.checkpoint),
    el("table", { style: { fontSize: "12px", width: "100%" } },
      row("plan", `${p.strategy}, ${group.world_size} ranks, ${p.dtype}`),
      row("devices", devices),
      row("state", el("span", {}, state, group.detail ? ` ${group.detail}` : "")),
      row("memory", memory),
      row("last job", split)));
}

function render(root, groups, error) {
  root.replaceChildren(
    el("h3", { style: { margin: "4px 0 8px" } }, "PipeFusion worker groups"),
    ...(error ? [el("div", { "data-pf": "error", style: { color: "#e57373" } }, error)] : []),
    ...(groups.length ? groups.map(groupCard)
      : [el("div", { "data-pf": "empty", style: { opacity: "0.7" } },
        "No warm group. The first PipeFusion prompt starts one; it stays warm between prompts.")]));
}

// One panel per sidebar tab instance: its own timer and listener, removed when the tab closes.
function mount(root) {
  root.style.padding = "8px";
  let alive = true;
  const refresh = async () => {
    if (!alive) return;
    try {
      const res = await api.fetchApi(ROUTE);
      if (!res.ok) throw new Error(`GET ${ROUTE}: HTTP ${res.status}`);
      render(root, (await res.json()).groups ?? [], "");
    } catch (err) {
      render(root, [], `Cannot read ${ROUTE}: ${err?.message ?? err}`);
    }
  };
  const onStatus = () => refresh().catch((err) => warn("refreshing the PipeFusion panel", err));
  api.addEventListener("pipefusion.status", onStatus);
  const timer = setInterval(onStatus, REFRESH_MS);
  onStatus();
  return () => {
    alive = false;
    clearInterval(timer);
    api.removeEventListener("pipefusion.status", onStatus);
  };
}

app.registerExtension({
  name: "comfy-pipefusion.panel",
  setup() {
    try {
      const manager = app.extensionManager;
      if (typeof manager?.registerSidebarTab !== "function") return; // an older frontend: no sidebar tabs
      let unmount = null;
      manager.registerSidebarTab({
        id: "comfy-pipefusion",
        icon: "pi pi-sitemap",
        title: "PipeFusion",
        tooltip: "PipeFusion worker groups",
        type: "custom",
        render: (root) => {
          try {
            unmount?.();
            unmount = mount(root);
          } catch (err) {
            warn("drawing the PipeFusion panel", err);
          }
        },
        destroy: () => {
          try {
            unmount?.();
            unmount = null;
          } catch (err) {
            warn("closing the PipeFusion panel", err);
          }
        },
      });
    } catch (err) {
      warn("adding the PipeFusion sidebar tab", err);
    }
  },
});
