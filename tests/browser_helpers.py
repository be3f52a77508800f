"""A headless Chromium page for tests (tests/browser/bridge.mjs, driven through playwright-core), and the
checks the browser tests share. Installed by tests/host/install_browser.sh (dev.sh setup runs it)."""
from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / ".artifacts" / "browser"
BROWSER_DIR = Path(os.environ.get("PIPEFUSION_BROWSER_DIR",
                                  Path.home() / ".cache" / "comfy-pipefusion" / "browser"))
CHROMIUM = os.environ.get("PIPEFUSION_CHROMIUM", "/usr/bin/chromium")
OUR_TYPES = ("PipeFusionDiTLoader", "PipeFusionKSampler", "PipeFusionUnload", "PipeFusionLoRA",
             "PipeFusionParallelize")


def browser_ready() -> str:
    """Installs chromium and playwright-core when missing; returns '' when both are there, else why not.
    Only a machine that cannot install them (not root) may skip; as root a failure fails the test."""
    rc = subprocess.run(["bash", str(ROOT / "tests/host/install_browser.sh"), str(BROWSER_DIR)]).returncode
    missing = [what for what, ok in (
        (CHROMIUM, os.access(CHROMIUM, os.X_OK)),
        (f"playwright-core in {BROWSER_DIR}/node_modules", (BROWSER_DIR / "node_modules/playwright-core").is_dir()),
        ("node", subprocess.run(["sh", "-c", "command -v node"], capture_output=True).returncode == 0))
        if not ok]
    if not missing:
        return ""
    why = (f"browser tests need {', '.join(missing)}; tests/host/install_browser.sh (exit {rc}) could not "
           f"install them")
    if os.geteuid() == 0:
        pytest.fail(why + " although this runs as root: see its output above", pytrace=False)
    return why + " (it needs root for apt-get install chromium)"


class Page:
    """One Chromium page; every call waits for the bridge's reply (or raises its error)."""

    def __init__(self, url: str, timeout: float = 120.0):
        env = {**os.environ, "PIPEFUSION_BROWSER_MODULES": str(BROWSER_DIR / "node_modules"),
               "PIPEFUSION_CHROMIUM": CHROMIUM}
        self.proc = subprocess.Popen(["node", str(ROOT / "tests/browser/bridge.mjs")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        self.timeout, self._id = timeout, 0
        self.events: list[dict] = []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        try:
            self.call("open", url=url)
        except BaseException:
            self.close()  # no bridge or browser left behind
            raise

    def call(self, op: str, **kw):
        self._id += 1
        self.proc.stdin.write(json.dumps({"id": self._id, "op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the browser bridge exited ({self.proc.poll()}): {''.join(self.stderr)[-3000:]}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"browser {op} failed: {reply['error']}")
        return reply["value"]

    def js(self, src: str, arg=None):
        """Runs ``src`` (a JS function of one argument, may be async) in the page; returns its JSON value."""
        return self.call("eval", src=src, arg=arg)

    def wait(self, src: str, arg=None, timeout: float = 30.0):
        """Waits until ``src(arg)`` is truthy in the page; returns that value."""
        return self.call("wait", src=src, arg=arg, timeout=int(timeout * 1000))

    def shot(self, name: str, selector: str | None = None) -> Path:
        path = ARTIFACTS / f"{name}.png"
        self.call("screenshot", path=str(path), selector=selector)
        return path

    def close_dialogs(self) -> None:
        """Closes ComfyUI's dialogs with their close button (an x icon), and waits until none is left."""
        self.js("""() => { for (const d of document.querySelectorAll('.p-dialog'))
            (d.querySelector('.p-dialog-close-button, .p-dialog-header-close')
             ?? d.querySelector('button .pi-times, button [class*="lucide--x"]')?.closest('button'))?.click();
          return true; }""")
        self.wait("() => !document.querySelector('.p-dialog')", timeout=10)

    def take_events(self) -> list[dict]:
        new = self.call("events")
        self.events.extend(new)
        return new

    def load_prompt(self, prompt: dict, name: str, offset: tuple[int, int] = (60, 80)) -> None:
        """Load an API-format prompt as the workflow ``name``, at 100% zoom with the graph at ``offset``;
        returns when our two nodes are there."""
        self.js("(p) => { app.loadApiJson(p.prompt, p.name); return true; }", {"prompt": prompt, "name": name})
        self.wait("() => pfTest.ours().length === 2")
        self.js("""(o) => { const ds = app.canvas.ds; ds.scale = 1; ds.offset[0] = o[0]; ds.offset[1] = o[1];
                           app.canvas.setDirty(true, true); return true; }""", list(offset))

    def queue_recorded(self, timeout: float, wait: bool = True):
        """Queue the loaded workflow with RECORD running; with ``wait``, return the record once the prompt
        ended (and a few frames were drawn)."""
        self.js(RECORD)
        self.js("async () => { await app.queuePrompt(0, 1); return true; }")
        return self.wait("() => pfRun.end && pfRun.frames.length >= 5 && pfRun", timeout=timeout) if wait else None

    def close(self):
        try:
            if self.proc.poll() is None and not self.proc.stdin.closed:
                self.call("close")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def page_problems(events: list[dict], ours: tuple[str, ...] = ("pipefusion",)) -> list[dict]:
    """Uncaught page errors, and console errors/warnings or failed requests to the server that concern our
    extension (the frontend's calls to api.comfy.org fail on a machine without internet: not ours)."""
    out = []
    for e in events:
        text = (e.get("text", "") + " " + e.get("url", "")).lower()
        local = e.get("url", "").startswith(("http://127.0.0.1", "http://localhost"))
        if e["kind"] == "pageerror":
            out.append(e)
        elif e["kind"] in ("requestfailed", "http") and local and any(o in text for o in ours):
            out.append(e)
        elif e["kind"] == "console" and e["type"] in ("error", "warning") and any(o in text for o in ours) \
                and (local or not e.get("url")):
            out.append(e)
    return out


# In-page helpers, defined once on window by the fixture.
PAGE_HELPERS = r"""() => {
  const ours = new Set(%s);
  window.pfTest = {
    ours: () => app.graph._nodes.filter((n) => ours.has(n.comfyClass ?? n.type)),
    // Our badge's text on a node, as the frontend would draw it now ('' = none shown).
    badge: (node) => {
      const b = (node.badges ?? []).map((x) => (typeof x === "function" ? x() : x));
      return b.map((x) => x?.text ?? "").filter((t) => t.startsWith("PipeFusion")).join("|");
    },
    // Screen rectangle [x, y, w, h] of a node, title included, in CSS pixels of the page.
    rect: (node) => {
      const b = node.getBounding(new Float32Array(4));
      const ds = app.canvas.ds, c = app.canvas.canvas.getBoundingClientRect();
      return [c.left + (b[0] + ds.offset[0]) * ds.scale, c.top + (b[1] + ds.offset[1]) * ds.scale,
              b[2] * ds.scale, b[3] * ds.scale];
    },
  };
  return true;
}""" % json.dumps(OUR_TYPES)


# Records, every animation frame while a prompt runs: the canvas's frame counter (it stops when a draw
# throws), our badges, the sampler's progress, and whether our nodes' title bars are painted on the canvas.
RECORD = r"""() => {
  const rec = { frames: [], badges: [], progress: [], invisible: 0, samples: 0, end: null, statuses: [], previews: 0 };
  window.pfRun = rec;
  const { api } = window.comfyAPI.api;
  api.addEventListener("pipefusion.status", (e) => rec.statuses.push(e.detail.state));
  for (const t of ["execution_success", "execution_error", "execution_interrupted"])
    api.addEventListener(t, () => { rec.end ??= t; });
  const ctx = app.canvas.canvas.getContext("2d");
  const hex = (s) => [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16));
  const tick = () => {
    app.canvas.setDirty(true, true);
    rec.frames.push(app.canvas.frame);
    for (const n of pfTest.ours()) {
      const b = pfTest.badge(n);
      if (b && rec.badges.at(-1) !== b) rec.badges.push(b);
      if (n.type === "PipeFusionKSampler" && n.progress !== undefined && rec.progress.at(-1) !== n.progress)
        rec.progress.push(n.progress);
      // The live preview shown in the sampler node (the frontend keeps it per node id, and on the node).
      if (n.type === "PipeFusionKSampler")
        rec.previews = Math.max(rec.previews, (app.nodePreviewImages?.[String(n.id)] ?? []).length,
                                (n.imgs ?? []).filter((i) => i?.naturalWidth > 0).length);
      // The title bar's colour at its right end, in device pixels of the canvas.
      const ds = app.canvas.ds, r = window.devicePixelRatio || 1;
      const x = (n.pos[0] + n.size[0] - 12 + ds.offset[0]) * ds.scale * r;
      const y = (n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2 + ds.offset[1]) * ds.scale * r;
      if (x > 0 && y > 0 && x < app.canvas.canvas.width && y < app.canvas.canvas.height) {
        const px = ctx.getImageData(x, y, 1, 1).data, want = hex(n.color ?? LiteGraph.NODE_DEFAULT_COLOR);
        rec.samples++;
        if (Math.abs(px[0] - want[0]) + Math.abs(px[1] - want[1]) + Math.abs(px[2] - want[2]) > 60) rec.invisible++;
      }
    }
    if (!rec.end || rec.frames.length < 5) requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
  return true;
}"""
