// comfy-pipefusion: shows the worker group's state (starting, loading, ready, busy, failed, stopped) on PipeFusion nodes.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const COLORS = { starting: "#a86f00", loading: "#6a1b9a", ready: "#2e7d32", busy: "#1565c0", failed: "#c62828", stopped: "#555555" };
const TYPES = new Set(["PipeFusionDiTLoader", "PipeFusionKSampler", "PipeFusionUnload"]);

function pipefusionNodes() {
  return (app.graph?._nodes ?? []).filter((n) => TYPES.has(n.comfyClass ?? n.type));
}

function show(state, detail) {
  for (const node of pipefusionNodes()) {
    node.pipefusionState = state;
    node.badges = [{ text: `group: ${state}${detail ? " · " + detail : ""}`, bgColor: COLORS[state] ?? "#555" }];
    node.boxcolor = COLORS[state];
    node.setDirtyCanvas?.(true, true);
  }
}

app.registerExtension({
  name: "comfy-pipefusion.status",
  setup() {
    api.addEventListener("pipefusion.status", (event) => show(event.detail.state, event.detail.detail));
  },
});
