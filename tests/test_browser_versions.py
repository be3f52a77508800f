"""The web extension on the frontends of the other ComfyUI releases the suite uses (tests/test_comfy_versions.py
lists them; $PIPEFUSION_TEST_COMFY_VERSIONS replaces the list): a PipeFusion prompt runs with the page open,
the badge shows the group's states and the canvas keeps drawing. tests/test_browser.py covers the default
release in full."""
from __future__ import annotations

import pytest

from browser_helpers import PAGE_HELPERS, Page, browser_ready, page_problems
from comfy_helpers import flux_prompt, other_releases, start_release_server

UNET = "tiny-flux.safetensors"

pytestmark = pytest.mark.slow  # a ComfyUI server and a browser per release: ~20 s each

VERSIONS = other_releases()


@pytest.fixture(scope="module", params=VERSIONS)
def release(request, tmp_path_factory, serial_model):
    why = browser_ready()
    if why:
        pytest.skip(why)
    version = request.param
    srv = start_release_server(tmp_path_factory, serial_model, UNET, version, f"comfy-{version}-browser")
    srv.post_json("/settings/Comfy.TutorialCompleted", True)
    page = None
    try:
        page = Page(srv.url)
        page.wait("() => (window.app ?? window.comfyAPI?.app?.app)?.canvas"
                  " && window.LiteGraph?.registered_node_types?.PipeFusionKSampler", timeout=120)
        page.js("() => { window.app ??= window.comfyAPI.app.app; return true; }")
        page.js(PAGE_HELPERS)
        yield version, srv, page
    finally:
        if page is not None:
            page.close()
        srv.stop()


def test_browser_badge_on_other_releases(release):
    version, srv, page = release
    version_seen = srv.get("/system_stats")["system"]["comfyui_version"]
    assert version_seen == version
    page.load_prompt(flux_prompt(UNET, steps=4, seed=3, prefix=f"latents/browser-{version}"), "pipefusion-run.json")
    rec = page.queue_recorded(240)
    page.shot(f"08-release-{version}-after-run")
    assert rec["end"] == "execution_success", srv.log_tail(40)
    assert [s for i, s in enumerate(rec["statuses"]) if i == 0 or rec["statuses"][i - 1] != s] == \
        ["starting", "loading", "busy", "ready"], rec["statuses"]
    frames = rec["frames"]
    assert frames[-1] - frames[0] >= len(frames) // 2, frames  # the canvas drew all along
    assert rec["samples"] > 0 and rec["invisible"] == 0, rec
    assert rec["badges"] and rec["badges"][-1].startswith("PipeFusion: ready"), rec["badges"]
    assert page_problems(page.take_events()) == []
