"""The extension in a real browser: headless Chromium (playwright-core) on ComfyUI's own page, served by a
real ComfyUI server with the extension installed. One server and one page for the module; screenshots of
each step go to tests/.artifacts/browser/ (git-ignored) for a developer to look at."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from browser_helpers import PAGE_HELPERS, Page, browser_ready, page_problems
from comfy_helpers import flux_prompt, start_model_server, worker_pids

UNET = "tiny-flux.safetensors"
WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))


def dedup(states: list[str]) -> list[str]:
    """The states without consecutive repeats."""
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


@pytest.fixture(scope="module")
def server(tmp_path_factory, serial_model):
    why = browser_ready()
    if why:
        pytest.skip(why)
    # Weights that take a moment to load (only when a group reads them), so that "loading" can be seen.
    srv = start_model_server(tmp_path_factory, serial_model, UNET, "comfy-browser",
                             extra_env={"PIPEFUSION_DEBUG_LOAD_DELAY_S": "2.5"},
                             args=("--preview-method", "latent2rgb"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    # A returning user: the templates browser does not open by itself on the first visit.
    server.post_json("/settings/Comfy.TutorialCompleted", True)
    p = Page(server.url)
    try:
        p.wait("() => (window.app ?? window.comfyAPI?.app?.app)?.canvas"
               " && window.LiteGraph?.registered_node_types?.PipeFusionKSampler",
               timeout=120)
        p.js("() => { window.app ??= window.comfyAPI.app.app; return true; }")
        p.js(PAGE_HELPERS)
        yield p
    finally:
        p.close()


def test_browser_page_loads_clean(page):
    """ComfyUI's page with the extension: our script is served, registered, and nothing of ours errs."""
    page.wait("() => (window.comfyAPI?.app?.app ?? window.app).extensionManager !== undefined", timeout=60)
    names = page.js("() => app.extensions.map((e) => e.name)")
    assert "comfy-pipefusion.status" in names
    page.shot("01-page-loaded")
    events = page.take_events()
    assert page_problems(events) == [], events
    served = page.js("async () => await (await fetch('/api/extensions')).json()")
    assert "/extensions/comfy-pipefusion/pipefusion.js" in served


# Loads a UI workflow at 100% zoom and measures it: node types the page does not know, pairs of nodes whose
# boxes (title included) overlap, and for our nodes each widget's box and whether the canvas is what the
# page shows at its centre (no other node, panel or toolbar over it).
LOAD_AND_MEASURE = r"""async (wf) => {
  await app.loadGraphData(wf, true, true, null, { showMissingNodesDialog: false, showMissingModelsDialog: false });
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));  // sizes settle on draw
  const nodes = app.graph._nodes;
  const missing = nodes.filter((n) => !LiteGraph.registered_node_types[n.type]).map((n) => n.type);
  const boxes = nodes.map((n) => ({ id: n.id, type: n.type, b: Array.from(n.getBounding(new Float32Array(4))) }));
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++)
    for (let j = i + 1; j < boxes.length; j++) {
      const [a, b] = [boxes[i].b, boxes[j].b];
      if (a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3])
        overlaps.push(`${boxes[i].type}#${boxes[i].id} / ${boxes[j].type}#${boxes[j].id}`);
    }
  const view = { scale: app.canvas.ds.scale, offset: Array.from(app.canvas.ds.offset) };
  const offscreen = nodes.filter((n) => { const [x, y, w, h] = pfTest.rect(n);
    return x < 0 || y < 0 || x + w > innerWidth || y + h > innerHeight; }).map((n) => n.type);
  return { missing, overlaps, view, offscreen, ours: pfTest.ours().map((n) => n.id) };
}"""

# Puts one node at the top left of the canvas at 100% zoom, draws, and checks each of its widgets.
FOCUS_AND_CHECK = r"""async (id) => {
  const node = app.graph.getNodeById(id);
  const ds = app.canvas.ds;
  ds.scale = 1;
  ds.offset[0] = 80 - node.pos[0];
  ds.offset[1] = 120 - node.pos[1];
  app.canvas.setDirty(true, true);
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const canvas = app.canvas.canvas, c = canvas.getBoundingClientRect();
  const hidden = [], outside = [];
  for (const w of node.widgets ?? []) {
    if (w.hidden || w.type === "hidden") continue;
    const h = w.computeSize?.(node.size[0])?.[1] ?? LiteGraph.NODE_WIDGET_HEIGHT;
    const y = w.last_y ?? w.y;
    if (y === undefined || y + h > node.size[1] + 1) {
      outside.push(`${w.name}: y=${y} h=${h} node h=${node.size[1]}`);
      continue;
    }
    for (const fx of [0.1, 0.5, 0.9]) {
      const x = c.left + (node.pos[0] + node.size[0] * fx + ds.offset[0]) * ds.scale;
      const yy = c.top + (node.pos[1] + y + h / 2 + ds.offset[1]) * ds.scale;
      const el = document.elementFromPoint(x, yy);
      if (el !== canvas) hidden.push(`${w.name} at ${fx}: under ${el?.tagName}.${el?.className}`);
      for (const dy of [2, h / 2, h - 2]) {
        const [px, py] = [node.pos[0] + node.size[0] * fx, node.pos[1] + y + dy];
        const other = app.graph._nodes.find((o) => o !== node && o.isPointInside?.(px, py));
        if (other) hidden.push(`${w.name} at ${fx}: under node ${other.type}`);
      }
    }
  }
  return { hidden, outside, widgets: (node.widgets ?? []).map((w) => w.name) };
}"""


def test_browser_templates_show_thumbnails(page, server):
    """The template browser lists our workflows under the extension, each card with its picture (the
    <name>.jpg beside the JSON, which ComfyUI serves under /api/workflow_templates/<extension>/)."""
    listed = server.get("/api/workflow_templates")["comfy-pipefusion"]
    assert sorted(listed) == sorted(p.stem for p in WORKFLOWS)
    for name in listed:
        assert server.get(f"/api/workflow_templates/comfy-pipefusion/{quote(name)}.jpg")[:3] == b"\xff\xd8\xff", name
    page.js("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); return true; }")
    ours = "() => [...document.querySelectorAll('.p-dialog *')].filter((e) => e.innerText?.trim() === 'comfy-pipefusion')"
    page.wait(f"() => ({ours})().length > 0")
    try:
        _templates_have_pictures(page, ours, listed)
    finally:
        page.close_dialogs()
    assert page_problems(page.take_events()) == []


def _templates_have_pictures(page, ours, listed):
    page.js(f"() => {{ ({ours})().at(-1).click(); return true; }}")
    # The frontend fetches each picture and shows it from a blob: URL; a 404 would be in the page's events.
    # It renders the pictures of the cards in view only: each card is scrolled into view, then its picture read.
    # The card's title is below its picture: the title goes to the bottom of the view (block "end"), which brings
    # the picture into view whatever the order of the cards (the server lists them in the file system's order).
    sizes = [page.wait("""(name) => {
        const cardOf = (img) => { let c = img; while (c && !c.innerText?.trim()) c = c.parentElement; return c; };
        const img = [...document.querySelectorAll('.p-dialog img')].find((i) => cardOf(i)?.innerText.includes(name));
        if (!img) { [...document.querySelectorAll('.p-dialog *')].find((e) => e.children.length === 0
                      && e.innerText?.trim() === name)?.scrollIntoView({ block: 'end' }); return false; }
        img.scrollIntoView();
        return img.complete && img.naturalWidth > 0 && [img.naturalWidth, img.naturalHeight]; }""",
                       name, timeout=30) for name in listed]
    assert sizes == [[512, 512]] * len(listed)
    text = page.js("() => document.querySelector('.p-dialog').innerText")
    assert all(name in text for name in listed), text
    page.shot("05-templates")


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_browser_workflow_loads_readable(page, path):
    """Each workflow: every node type known, no two nodes overlapping, and every widget of our nodes
    unobscured at 100% zoom (screenshot per node)."""
    result = page.js(LOAD_AND_MEASURE, json.loads(path.read_text()))
    assert result["missing"] == []
    assert result["overlaps"] == []
    assert 0.7 <= result["view"]["scale"] <= 1.0, f"{path.name} opens at zoom {result['view']['scale']}"
    assert result["offscreen"] == [], f"{path.name} opens with nodes outside the window: {result['offscreen']}"
    page.shot(f"02-{path.stem}-opened")
    assert result["ours"], f"{path.name} has none of our nodes"
    for node_id in result["ours"]:
        check = page.js(FOCUS_AND_CHECK, node_id)
        page.shot(f"02-{path.stem}-node{node_id}-100pct")
        assert check["outside"] == [] and check["hidden"] == [], check
    assert page_problems(page.take_events()) == []


@pytest.mark.slow
def test_browser_prompt_runs_with_the_page_open(page, server):
    """A PipeFusion prompt (cpu:2) queued from the page: the canvas keeps drawing, our nodes stay painted,
    the badge shows each state of the group, the sampler node's progress bar moves and its live preview
    (--preview-method latent2rgb) appears in the node."""
    page.load_prompt(flux_prompt(UNET, steps=60, seed=3, prefix="latents/browser"), "pipefusion-run.json")
    page.shot("03-run-before")
    page.queue_recorded(0, wait=False)
    shot_states, deadline = set(), time.monotonic() + 300
    while time.monotonic() < deadline:
        now = page.js("() => ({ end: pfRun.end, badge: pfRun.badges.at(-1) ?? '', progress: pfRun.progress.at(-1) })")
        state = now["badge"].split(":")[1].split("·")[0].strip() if ":" in now["badge"] else ""
        if state and state not in shot_states:
            shot_states.add(state)
            page.shot(f"03-run-{len(shot_states)}-{state}")
        if now.get("progress") and 0.3 < now["progress"] < 0.9 and "progress" not in shot_states:
            shot_states.add("progress")
            page.shot("03-run-progress")
        if now["end"]:
            break
        time.sleep(0.1)
    rec = page.wait("() => pfRun.end && pfRun.frames.length >= 5 && pfRun", timeout=60)
    page.shot("03-run-after")
    assert rec["end"] == "execution_success", server.log_tail(40)
    frames = rec["frames"]
    assert all(b >= a for a, b in zip(frames, frames[1:])) and frames[-1] - frames[0] >= len(frames) // 2, frames
    assert rec["samples"] > 0 and rec["invisible"] == 0, rec
    # A cold group: each state in order (loading repeats with the bytes read per rank), no "ready" between
    # start-up and the job.
    assert dedup(rec["statuses"]) == ["starting", "loading", "busy", "ready"], rec["statuses"]
    seen = {b.split(":")[1].split("·")[0].strip() for b in rec["badges"]}
    assert {"starting", "loading", "busy", "ready"} <= seen, rec["badges"]
    assert any(re.fullmatch(r"PipeFusion: loading · read per rank: \d+, \d+ MiB", b) for b in rec["badges"]), \
        rec["badges"]
    assert rec["badges"][-1].startswith("PipeFusion: ready"), rec["badges"]
    moving = [p for p in rec["progress"] if 0 < p < 1]
    assert len(set(moving)) >= 3, rec["progress"]
    assert rec["previews"] >= 1, "no live preview appeared in the PipeFusion KSampler node"
    # The same prompt again on the warm group: busy, then ready; no loading flash.
    rec = page.queue_recorded(120)
    assert rec["end"] == "execution_success", server.log_tail(40)
    assert rec["statuses"] == ["busy", "ready"], rec["statuses"]
    assert page_problems(page.take_events()) == []


# The colour of the canvas where the fallback draws the state (above each of our nodes' title, right end).
PILL_COLOURS = r"""() => {
  const ctx = app.canvas.canvas.getContext("2d"), ds = app.canvas.ds, r = window.devicePixelRatio || 1;
  return pfTest.ours().map((n) => {
    const x = (n.pos[0] + n.size[0] - 4 + ds.offset[0]) * ds.scale * r;
    const y = (n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT - 12 + ds.offset[1]) * ds.scale * r;
    return Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
  });
}"""


def test_browser_fallback_without_the_badge_api(page, server):
    """A frontend without LGraphBadge: the state is drawn by the node itself, and the canvas keeps drawing."""
    page.js("() => { window.pfHiddenBadge = window.LGraphBadge; delete window.LGraphBadge; return true; }")
    try:
        page.load_prompt(flux_prompt(UNET, steps=6, seed=6, prefix="latents/browser-fallback"),
                         "pipefusion-fallback.json", offset=(60, 120))
        page.wait("() => pfTest.ours().every((n) => n.pipefusionBadge === 'foreground')")
        rec = page.queue_recorded(120)
    finally:
        page.js("() => { window.LGraphBadge = window.pfHiddenBadge; return true; }")
    assert rec["end"] == "execution_success", server.log_tail(40)
    assert rec["statuses"][-2:] == ["busy", "ready"], rec["statuses"]
    assert rec["frames"][-1] - rec["frames"][0] >= len(rec["frames"]) // 2, rec["frames"]
    page.js("() => { app.canvas.setDirty(true, true); return true; }")
    page.wait("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
    page.shot("03-run-fallback-ready")
    ready = (0x2E, 0x7D, 0x32)
    for colour in page.js(PILL_COLOURS):
        assert sum(abs(a - b) for a, b in zip(colour, ready)) < 30, colour
    assert page_problems(page.take_events()) == []



def test_browser_status_panel_lists_the_warm_group(page, server):
    """The PipeFusion sidebar tab shows the warm group of the prompt above: plan, devices, memory per rank,
    state and the last job's time split, as GET /pipefusion/groups reports them."""
    groups = server.get("/pipefusion/groups")["groups"]
    assert len(groups) == 1 and groups[0]["state"] == "ready", groups
    page.js("() => { document.querySelector('.comfy-pipefusion-tab-button').click(); return true; }")
    text = page.wait("() => document.querySelector('[data-pf=group]')?.innerText", timeout=15)
    page.shot("07-status-panel")
    rss = groups[0]["rss_bytes_per_rank"]
    assert "tiny-flux.safetensors" in text and "pipefusion, 2 ranks, float32" in text, text
    assert "ready" in text and "rank 0: " in text and "rank 1: " in text and len(rss) == 2 and min(rss) > 0, text
    job = groups[0]["last_job"]
    assert f"{job['wall_s']:.2f} s total: compute {job['compute_s']:.2f} s, waiting {job['wait_s']:.2f} s, " \
           f"transfer {job['transfer_s']:.2f} s" in text, (text, job)
    assert job["transfer_s"] > 0 and job["wait_s"] > 0 and job["compute_s"] > 0, job  # three measured parts
    page.js("() => { document.querySelector('.comfy-pipefusion-tab-button').click(); return true; }")
    page.wait("() => !document.querySelector('[data-pf=group]')", timeout=10)
    assert page_problems(page.take_events()) == []

def test_browser_bad_input_shows_as_a_validation_error(page, server):
    """devices 'banana' queued from the page: refused by POST /prompt (VALIDATE_INPUTS) and shown the way
    ComfyUI shows its own validation errors: the node outlined, the message in the error dialog."""
    prompt = flux_prompt(UNET, steps=2, seed=4, devices="banana", prefix="latents/browser-bad")
    page.js("(p) => { app.loadApiJson(p, 'pipefusion-bad.json'); return true; }", prompt)
    page.wait("() => pfTest.ours().length === 2")
    page.js("""() => { const n = pfTest.ours().find((n) => n.type === 'PipeFusionDiTLoader'), ds = app.canvas.ds;
                       ds.scale = 1; ds.offset[0] = 120 - n.pos[0]; ds.offset[1] = 160 - n.pos[1];
                       app.canvas.setDirty(true, true); return true; }""")
    page.js("async () => { await app.queuePrompt(0, 1); return true; }")
    errors = page.wait("() => app.lastNodeErrors && Object.keys(app.lastNodeErrors).length && app.lastNodeErrors",
                       timeout=30)
    loader = page.js("() => String(pfTest.ours().find((n) => n.type === 'PipeFusionDiTLoader').id)")
    assert list(errors) == [loader], errors
    detail = errors[loader]["errors"][0]
    assert detail["type"] == "custom_validation_failed"
    assert "devices 'banana': write GPU indices like 0,1 or cpu:2 or auto" in detail["details"]
    dialogs = "[...document.querySelectorAll('.p-dialog')].map((d) => d.innerText).join('\\n')"
    dialog = page.wait(f"() => {dialogs}.includes('banana') && {dialogs}", timeout=30)
    assert "PipeFusion DiT Loader" in dialog and "cpu:2" in dialog
    page.shot("04-bad-input-dialog")
    page.close_dialogs()
    page.js("() => { app.canvas.setDirty(true, true); return true; }")
    page.shot("04-bad-input-node")
    outline = page.js("(id) => { const n = app.graph.getNodeById(id); return n.strokeStyles?.nodeError?.call(n)?.color; }",
                      int(loader))
    assert outline, "the loader is not outlined as a node with errors"
    assert page_problems(page.take_events()) == []


def test_browser_worker_death_reads_well(page, server):
    """A rank killed mid-sampling: the dialog's message starts with what happened and what to do, the rank's
    last error line follows, and the tracebacks and torchrun log tail are in ComfyUI's log, not the dialog."""
    prompt = flux_prompt(UNET, steps=400, seed=5, prefix="latents/browser-death")
    page.js("(p) => { app.loadApiJson(p, 'pipefusion-death.json'); return true; }", prompt)
    page.wait("() => pfTest.ours().length === 2")
    page.js("async () => { await app.queuePrompt(0, 1); return true; }")
    page.wait("() => pfTest.ours().find((n) => n.type === 'PipeFusionKSampler').progress >= 2 / 400", timeout=120)
    os.kill(worker_pids(server.pid)[-1], signal.SIGKILL)
    text = page.wait("() => document.querySelector('.p-dialog')?.innerText", timeout=30)
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0] == "PipeFusionKSampler", lines
    assert lines[1].startswith("PipeFusion: the worker group died") and lines[1].endswith(
        "Queue the prompt again: the next prompt starts a fresh worker group."), lines
    assert not any(word in text for word in ("worker log:", "traceback:", "Root Cause", "File \"")), text
    assert "(the workers' tracebacks and log tail are in ComfyUI's log)" in text
    page.shot("06-worker-died-dialog")
    page.close_dialogs()
    # the group is gone: "stopped", with why, in the failure's colour
    assert page.wait("() => pfTest.badge(pfTest.ours()[0])").startswith(
        "PipeFusion: stopped · failed: the worker group died")
    assert page.js("() => pfTest.ours()[0].pipefusionBadge().bgColor") == "#c62828"
    page.shot("06-worker-died-badge")
    log = server.log_path.read_text(errors="replace")
    assert "the worker group died" in log and "worker log:" in log and "traceback:" in log
    assert page_problems(page.take_events()) == []
