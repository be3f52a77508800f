"""The extension on a real ComfyUI server, driven only through its HTTP API and websocket."""
from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from comfy_pipefusion import transport
from comfy_pipefusion.config import STRATEGIES, ParallelConfig, SampleSpec
from comfy_pipefusion.job import make_problem, synthetic_conditioning
from comfy_pipefusion.models import flux
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.parallel.serial import run_serial
from comfy_pipefusion.sampling.noise import comfy_noise

from comfy_helpers import flux_prompt, run_prompt, start_model_server, worker_pids

UNET = "tiny-flux.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory, serial_model):
    srv = start_model_server(tmp_path_factory, serial_model, UNET)
    yield srv
    srv.stop()


def latest_latent(srv, prefix: str) -> torch.Tensor:
    files = sorted((srv.base_dir / "output").glob(f"{prefix}_*.latent"), key=lambda p: p.stat().st_mtime)
    return load_file(str(files[-1]))["latent_tensor"]


def serial_reference(ckpt: Path, steps: int, seed: int) -> torch.Tensor:
    model, _ = load_rank_model(ModelSource(checkpoint=str(ckpt)), ParallelConfig("serial", 1), 0,
                               torch.device("cpu"), torch.float32)
    txt, pooled = synthetic_conditioning(flux.PRESETS["tiny"]["config"], 8, 1, 0)
    spec = SampleSpec(height=128, width=128, steps=steps, seed=seed)
    problem = make_problem(spec, txt, pooled, torch.zeros(1, 16, 16, 16), comfy_noise((1, 16, 16, 16), seed))
    with torch.inference_mode():
        return problem.finish(run_serial(model, problem, torch.float32, torch.device("cpu")))


def test_nodes_are_registered_with_comfyui_inputs(server):
    info = server.object_info()
    for name in ("PipeFusionDiTLoader", "PipeFusionKSampler", "PipeFusionUnload"):
        assert info[name]["category"] == "PipeFusion"
    loader = info["PipeFusionDiTLoader"]["input"]["required"]
    assert UNET in loader["unet_name"][0]
    assert set(loader) == {"unet_name", "weight_dtype", "devices", "strategy", "patches", "warmup_steps"}
    # every strategy of the engine (config.STRATEGIES: the hybrids too) but the naive-patch baseline, auto first
    assert loader["strategy"][0] == ["auto"] + [s for s in STRATEGIES if s not in ("auto", "naive_patch")]
    ours = info["PipeFusionKSampler"]["input"]["required"]
    stock = info["KSampler"]["input"]["required"]
    assert set(ours) - {"pipefusion_model"} == set(stock) - {"model"}
    assert ours["sampler_name"][0] == stock["sampler_name"][0] and ours["scheduler"][0] == stock["scheduler"][0]
    assert info["PipeFusionKSampler"]["output"] == ["LATENT"]


def test_prompt_matches_serial_with_progress_every_step(server):
    progress = []
    status, msgs = run_prompt(server, flux_prompt(UNET, steps=4, seed=42, warmup=4, prefix="latents/e2e"),
                           on_message=lambda m: m["type"] == "progress" and m["data"]["node"] == "4"
                           and progress.append(m["data"]["value"]))
    assert status == "execution_success", server.log_tail(40)
    assert progress == [1, 2, 3, 4]
    states = [m["data"]["state"] for m in msgs if m["type"] == "pipefusion.status"]
    assert states[-2:] == ["busy", "ready"], states  # what the web extension shows on the nodes
    out = latest_latent(server, "latents/e2e")
    ref = serial_reference(server.ckpt, 4, 42)
    assert out.shape == ref.shape == (1, 16, 16, 16)
    assert float((out - ref).abs().max()) <= 1e-5


def test_second_prompt_reuses_the_warm_group_and_interrupt_keeps_it(server):
    """Different seeds, steps, warm-up and patches: the same warm group (no restart) serves them all."""
    run_prompt(server, flux_prompt(UNET, steps=2, seed=1))
    pids = worker_pids(server.pid)
    assert len(pids) == 2
    status, _ = run_prompt(server, flux_prompt(UNET, steps=3, seed=2, warmup=2, patches=3))
    assert status == "execution_success" and worker_pids(server.pid) == pids

    # POST /interrupt while a long job runs: it ends interrupted. How many steps ComfyUI reported after this
    # client saw step 3 is not the ranks' doing: its progress hook raises (and reports nothing more) at the first
    # step after the interrupt reached the server, so that count is this client's delay in steps (several on a
    # loaded machine). That the ranks stop at the next step boundary once told is test_comm_rules' (exact steps).
    sent = []

    def interrupt_on_progress(m):
        if m["type"] == "progress" and m["data"]["value"] >= 3 and not sent:
            sent.append(m["data"]["value"])
            server.interrupt()
    status, msgs = run_prompt(server, flux_prompt(UNET, steps=400, seed=3), on_message=interrupt_on_progress)
    assert status == "execution_interrupted" and sent, (status, sent)
    status, _ = run_prompt(server, flux_prompt(UNET, steps=2, seed=4))
    assert status == "execution_success" and worker_pids(server.pid) == pids


def test_web_extension_is_served(server):
    import urllib.request
    with urllib.request.urlopen(f"{server.url}/extensions/comfy-pipefusion/pipefusion.js", timeout=10) as r:
        js = r.read().decode()
    assert "pipefusion.status" in js and "registerExtension" in js


def test_changed_plan_restarts_the_group(server):
    run_prompt(server, flux_prompt(UNET, steps=2, seed=5))
    before = worker_pids(server.pid)
    status, _ = run_prompt(server, flux_prompt(UNET, steps=2, seed=5, strategy="distrifusion"))
    assert status == "execution_success"
    after = worker_pids(server.pid)
    assert len(after) == 2 and set(after).isdisjoint(before)


def test_bad_input_is_a_clear_node_error(server):
    """An unimplemented sampler is refused when the prompt is queued (VALIDATE_INPUTS), on the node."""
    from comfy_server import ComfyServerError
    prompt = flux_prompt(UNET, steps=2, seed=9)
    prompt["4"]["inputs"]["sampler_name"] = "dpmpp_3m_sde"
    with pytest.raises(ComfyServerError) as err:
        server.queue_prompt(prompt)
    assert "HTTP 400" in str(err.value)
    assert "sampler 'dpmpp_3m_sde' is not implemented by the worker group; choose one of euler, euler_ancestral" \
        in str(err.value)


WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))


def widget_names(spec: dict) -> list[str]:
    """A node's widget inputs in ComfyUI's order, with the seed's control_after_generate widget and the upload
    button an ``image_upload`` input brings (LoadImage: its saved value is "image", as the frontend writes it)."""
    names = []
    for group in ("required", "optional"):
        for name, desc in spec["input"].get(group, {}).items():
            kind, opts = desc[0], (desc[1] if len(desc) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
                if opts.get("control_after_generate"):
                    names.append(name + ":control")
                if opts.get("image_upload"):
                    names.append(name + ":upload")
    return names


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_nodes_exist_and_links_are_consistent(server, path):
    import json
    wf = json.loads(path.read_text())
    info = server.object_info()
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}
    types = {n["type"] for n in nodes.values()}  # our loader and sampler, or the stock chain with Parallelize
    assert "SaveImage" in types and ({"PipeFusionDiTLoader", "PipeFusionKSampler"} <= types
                                     or {"UNETLoader", "PipeFusionParallelize", "KSampler"} <= types), types
    for n in nodes.values():
        assert n["type"] in info, f"{path.name}: node type {n['type']} is not on the server"
        spec = info[n["type"]]
        assert [o["type"] for o in n.get("outputs", [])] == list(spec["output"]), (path.name, n["type"])
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        widgets = [w for w in widget_names(spec) if w.split(":")[0] not in linked]
        assert len(n["widgets_values"]) == len(widgets), (path.name, n["type"], widgets)
        required = spec["input"].get("required", {})
        for name, desc in required.items():
            if not (isinstance(desc[0], list) or desc[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")):
                assert name in linked, f"{path.name}: {n['type']}.{name} is not connected"
        for slot, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is not None:
                lid, src, src_slot, dst, dst_slot, typ = links[inp["link"]]
                assert (dst, dst_slot) == (n["id"], slot)
                assert nodes[src]["outputs"][src_slot]["type"] == typ == inp["type"]
                assert lid in nodes[src]["outputs"][src_slot]["links"]
    for lid, src, src_slot, dst, dst_slot, typ in links.values():
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid


def test_stopping_the_server_leaves_no_worker_and_no_segment(server):
    run_prompt(server, flux_prompt(UNET, steps=2, seed=10))
    pids = worker_pids(server.pid)
    tree = [p.pid for p in psutil.Process(server.pid).children(recursive=True)]
    assert pids
    server_pid = server.pid
    server.stop()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in tree):
        time.sleep(0.2)
    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert transport.shm_segments(server_pid) == []
