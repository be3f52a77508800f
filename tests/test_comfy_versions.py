"""The extension on other ComfyUI releases than the default host (tests/test_comfy.py covers that one).

Each release is installed on first use by tests/host/install_comfyui.sh; a failed install fails the test
(it is never skipped). $PIPEFUSION_TEST_COMFY_VERSIONS (comma-separated) replaces the list."""
from __future__ import annotations

import pytest

from comfy_helpers import flux_prompt, other_releases, run_prompt, start_release_server

VERSIONS = other_releases()
UNET = "tiny-flux.safetensors"
OUR_NODES = ("PipeFusionDiTLoader", "PipeFusionKSampler", "PipeFusionUnload", "PipeFusionTestConditioning")


@pytest.fixture(scope="module", params=VERSIONS)
def server(request, tmp_path_factory, serial_model):
    version = request.param
    srv = start_release_server(tmp_path_factory, serial_model, UNET, version, f"comfy-{version}")
    yield srv
    srv.stop()


def test_nodes_load(server):
    assert server.get("/system_stats")["system"]["comfyui_version"] == server.version
    info = server.object_info()
    assert [n for n in OUR_NODES if n not in info] == [], server.log_tail(80)
    ours = [str(server.base_dir / "custom_nodes" / name) for name in ("comfy-pipefusion", "pf_test_nodes")]
    failed = [line for line in server.log_path.read_text(errors="replace").splitlines()
              if ("IMPORT FAILED" in line or "Cannot import" in line) and any(d in line for d in ours)]
    assert failed == []


def test_tiny_prompt_succeeds(server):
    status, _ = run_prompt(server, flux_prompt(UNET, steps=2, seed=1, prefix=f"latents/v{server.version}"))
    assert status == "execution_success", server.log_tail(60)
