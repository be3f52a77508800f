"""The built-in trained model in a real ComfyUI server, driven through its HTTP API: the committed workflow
(workflows/Built-in shapes model on 2 CPU ranks (PipeFusion nodes, auto plan, 8 steps, no download).json:
loader, caption node, PipeFusion KSampler on 2 CPU ranks, decode node, SaveImage) runs end to end without downloads and saves the captioned picture; a bad caption is a clear
node error. One server for the module."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_pipefusion.builtin import judge as judges, latent, model as builtin, scenes, text
from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.job import make_problem, sampling_kind
from comfy_pipefusion.models import flux
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.parallel.serial import run_serial

from comfy_helpers import error_message, run_prompt, start_server

WORKFLOW = (Path(__file__).resolve().parent.parent / "workflows"
            / "Built-in shapes model on 2 CPU ranks (PipeFusion nodes, auto plan, 8 steps, no download).json")
WIDGETS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-builtin")
    run_dir = tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    shutil.copy(builtin.WEIGHTS, base / "models" / "diffusion_models" / builtin.WEIGHTS.name)
    srv = start_server(base, run_dir)
    yield srv
    srv.stop()


def to_api(wf: dict, info: dict) -> dict:
    """A UI-format workflow as the API prompt ComfyUI's frontend would queue (widgets in ComfyUI's order)."""
    links = {lk[0]: lk for lk in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        spec = info[n["type"]]["input"]
        linked = {i["name"]: links[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs, values = {}, iter(n["widgets_values"])
        for group in ("required", "optional"):
            for name, desc in spec.get(group, {}).items():
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                elif isinstance(desc[0], list) or desc[0] in WIDGETS:
                    inputs[name] = next(values)
                    if len(desc) > 1 and desc[1].get("control_after_generate"):
                        next(values)  # the "randomize" control widget is not an input
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def workflow_prompt(server, caption: str, seed: int, steps: int) -> tuple[dict, str]:
    prompt = to_api(json.loads(WORKFLOW.read_text()), server.object_info())
    by_type = {v["class_type"]: v for v in prompt.values()}
    by_type["PipeFusionBuiltinCaption"]["inputs"]["caption"] = caption
    by_type["PipeFusionKSampler"]["inputs"].update(seed=seed, steps=steps)
    prefix = f"builtin-{seed}"
    by_type["SaveImage"]["inputs"]["filename_prefix"] = prefix
    return prompt, prefix


def serial_picture(caption: str, seed: int, steps: int) -> torch.Tensor:
    """The serial reference of the same job in this process. [3, 128, 128]"""
    source = ModelSource(checkpoint=str(builtin.WEIGHTS))
    fam, config = source.describe()
    model, _ = load_rank_model(source, ParallelConfig("serial", 1), 0, torch.device("cpu"), torch.float32)
    table, vocab = builtin.load_text()
    txt, pooled = text.encode(table, [caption], vocab)
    spec = SampleSpec(height=latent.ENGINE_SIZE, width=latent.ENGINE_SIZE, steps=steps, seed=seed)
    problem = make_problem(spec, txt, pooled, fam="flux", fmt=flux.latent_format(config),
                           sampling=sampling_kind(fam, config))
    with torch.inference_mode():
        return latent.decode(problem.finish(run_serial(model, problem, torch.float32, torch.device("cpu"))))[0]


def test_builtin_workflow_runs_end_to_end_and_draws_the_caption(server):
    caption = "blue cross bottom left stripes"
    prompt, prefix = workflow_prompt(server, caption, seed=5, steps=8)
    status, msgs = run_prompt(server, prompt)
    assert status == "execution_success", (error_message(msgs), server.log_tail(40))
    files = sorted((server.base_dir / "output").glob(f"{prefix}_*.png"))
    assert len(files) == 1
    pic = torch.from_numpy(np.array(Image.open(files[0]).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert pic.shape == (3, 128, 128)
    judge = judges.load_beside(builtin.WEIGHTS)
    read = dict(zip(scenes.ATTRIBUTES, judge.read(pic[None])[0].tolist()))
    want = scenes.parse(caption)
    assert (read["colour"], read["row"], read["column"]) == (want.colour, want.row, want.column), read
    ref = serial_picture(caption, 5, 8)
    assert judge.agreement(pic[None], [caption]) >= judge.agreement(ref[None], [caption])
    mse = float(((pic - ref) ** 2).mean())
    assert mse < 10 ** -2.5, mse  # the plan auto picks on 2 ranks (1 warm-up step) stays near serial: > 25 dB


def test_builtin_bad_caption_is_a_clear_node_error(server):
    prompt, _ = workflow_prompt(server, "purple circle top left plain", seed=1, steps=2)
    status, msgs = run_prompt(server, prompt)
    assert status == "execution_error"
    message = error_message(msgs)
    assert "PipeFusion Built-in Caption" in message and "'purple' is not a colour" in message, message
