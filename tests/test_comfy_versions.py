"""The extension on other ComfyUI releases than the default host (tests/test_comfy.py covers that one).

Each release is installed on first use by tests/host/install_comfyui.sh; a failed install fails the test
(it is never skipped). $PIPEFUSION_TEST_COMFY_VERSIONS (comma-separated) replaces the list."""
from __future__ import annotations

import pytest

from comfy_helpers import flux_prompt, other_releases, run_prompt, start_release_server

VERSIONS = other_releases()
UNET = "tiny-flux.safetensors"
OUR_NODES = ("PipeFusionDiTLoader", "PipeFusionKSampler", "PipeFusionUnload", "PipeFusionParallelize",
             "PipeFusionTestConditioning")


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


def test_parallelize_lora_equals_stock_on_release(server):
    """PipeFusion Parallelize's OUTER_SAMPLE wrapper and weight patches on this release: the small SD3.5 model with
    a kohya LoRA, stock KSampler with and without our node, then this release's DualCFGGuider (nested style:
    three conditionings in the group's batch) on the warm group (tests/test_parallelize_comfy.py on the default
    host)."""
    import torch

    from comfy_pipefusion.models import family, sd3
    from comfy_pipefusion.models.checkpoint_write import write_checkpoint
    from lora_files import write_kohya
    from test_parallelize_comfy import TOL, _both, _common, dual_cfg, ksampler, run_pair, with_middle
    from test_parity_comfy import SD3_CONFIG, SD3_FILE, rel_l2

    model = sd3.build_meta(SD3_CONFIG)
    sd3.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_checkpoint(server.base_dir / "models" / "diffusion_models" / SD3_FILE, model.state_dict(), "sd3",
                     dict(model.config), dtype=torch.float32)
    (server.base_dir / "models" / "loras").mkdir(parents=True, exist_ok=True)
    write_kohya(server.base_dir / "models" / "loras" / "sd3-kohya.safetensors", "sd3")
    nodes, _ = _common("sd3", [("kohya", 0.8)])
    prefix = f"par/v{server.version}"
    stock, ours = run_pair(server, _both(nodes, ksampler("sd3"), prefix), prefix)
    assert float(stock.abs().max()) > 0.1
    assert rel_l2(ours, stock) <= TOL
    stock, ours = run_pair(server, _both(with_middle(nodes), dual_cfg("nested", 2.5, 1.5), f"{prefix}_dual"),
                           f"{prefix}_dual")
    assert float(stock.abs().max()) > 0.1
    assert rel_l2(ours, stock) <= TOL, f"DualCFGGuider on {server.version}: {rel_l2(ours, stock):.3e}"
