"""The core pieces of the MODEL path (issue 12), without ComfyUI: a job's given sigmas, and a rank's in-place
update of some weights from a file in the checkpoint's layout (what a LoRA change sends to the warm group)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_pipefusion.config import SampleSpec
from comfy_pipefusion.job import make_problem
from comfy_pipefusion.models.checkpoint import CheckpointError, open_checkpoint, update_modules
from test_checkpoint import CPU, all_names, load_all, write


def test_parallelize_given_sigmas_replace_the_schedule():
    """ComfyUI's own sigmas (a SplitSigmas half, custom sigmas) are sampled as given; a schedule that does not
    fit the steps, or with a negative or non-finite value, is refused naming it."""
    spec = SampleSpec(height=32, width=32, steps=2, scheduler="karras")
    txt, pooled = torch.randn(1, 4, 32), torch.randn(1, 24)
    given = torch.tensor([0.7, 0.3, 0.0])
    problem = make_problem(spec, txt, pooled, sigmas=given)
    assert torch.equal(problem.sigmas, given)
    assert not torch.equal(make_problem(spec, txt, pooled).sigmas, given)  # the scheduler's are others
    with pytest.raises(ValueError, match="4 sigmas given for 2 steps"):
        make_problem(spec, txt, pooled, sigmas=torch.tensor([0.9, 0.7, 0.3, 0.0]))
    with pytest.raises(ValueError, match="finite and non-negative"):
        make_problem(spec, txt, pooled, sigmas=torch.tensor([0.7, -0.3, 0.0]))


def test_parallelize_update_modules_overwrites_only_the_given_weights(tmp_path):
    """A file with one fused original-layout weight (Flux's img_attn.qkv) and one plain one: the loaded model's
    q, k, v and the plain weight take the new values, everything else keeps its own; a name that is not the
    model's is refused."""
    path, _ = write(tmp_path, "flux")
    info = open_checkpoint(path)
    model = load_all(info)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qkv = torch.randn(3 * 64, 64)
    proj = torch.randn(64, 64)
    update = tmp_path / "update.safetensors"
    save_file({"double_blocks.1.img_attn.qkv.weight": qkv, "double_blocks.1.img_attn.proj.weight": proj}, str(update))
    assert update_modules(model, info, update, all_names(model)) == 4
    after = model.state_dict()
    attn = "transformer_blocks.1.attn."
    changed = {attn + "to_q.weight": qkv[:64], attn + "to_k.weight": qkv[64:128], attn + "to_v.weight": qkv[128:],
               attn + "to_out.0.weight": proj}
    for key, want in changed.items():
        assert torch.equal(after[key], want), key
    assert all(torch.equal(after[k], v) for k, v in before.items() if k not in changed)
    # a stage updates only what it holds: another rank's names leave this block alone
    update_modules(model, info, update, ["transformer_blocks.0"])
    assert torch.equal(model.state_dict()[attn + "to_q.weight"], qkv[:64])
    save_file({"double_blocks.9.img_attn.qkv.weight": qkv}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="double_blocks.9.img_attn.qkv.weight is not a tensor of"):
        update_modules(model, info, tmp_path / "bad.safetensors", all_names(model))


def test_parallelize_update_modules_keeps_the_device_and_dtype(tmp_path):
    """The update is cast into the loaded tensor (bf16 here) in place: the same storage, its dtype kept."""
    path, _ = write(tmp_path, "flux")
    info = open_checkpoint(path)
    model = load_all(info, torch.bfloat16)
    target = model.transformer_blocks[1].attn.to_out[0].weight
    ptr = target.data_ptr()
    proj = torch.randn(64, 64)
    save_file({"double_blocks.1.img_attn.proj.weight": proj}, str(tmp_path / "u.safetensors"))
    update_modules(model, info, tmp_path / "u.safetensors", all_names(model))
    assert target.data_ptr() == ptr and target.dtype == torch.bfloat16 and target.device == CPU
    assert torch.equal(target, proj.to(torch.bfloat16))
