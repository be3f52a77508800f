"""Devices as ComfyUI users set them (issue 10 §5): the parent's CUDA_VISIBLE_DEVICES maps the loader's
indices to physical GPUs, the workers' allocator, the loader's stage split and ``auto`` placement."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from comfy_pipefusion.oneshot import allocator_env, visible_devices, worker_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def convert():
    """nodes/convert.py imports no ComfyUI module; the nodes package does, so load the file alone."""
    spec = importlib.util.spec_from_file_location("pf_nodes_convert", ROOT / "nodes" / "convert.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_devices_are_counted_among_the_parents_visible_gpus():
    assert visible_devices((0, 1), None) == "0,1"  # no restriction: indices are physical
    assert visible_devices((0,), "1") == "1"  # ComfyUI --cuda-device 1: its GPU 0 is physical 1
    assert visible_devices((1, 0), "2,3") == "3,2"
    uuids = "GPU-aaaaaaaa-0000-0000-0000-000000000001,GPU-bbbbbbbb-0000-0000-0000-000000000002"
    assert visible_devices((1,), uuids) == "GPU-bbbbbbbb-0000-0000-0000-000000000002"
    assert visible_devices((0,), " 5 , 7 ") == "5"
    with pytest.raises(ValueError, match=r"GPU 2 does not exist here: CUDA_VISIBLE_DEVICES='2,3' makes 2 GPU"):
        visible_devices((0, 2), "2,3")
    with pytest.raises(ValueError, match="sees no GPU; use cpu:N"):
        visible_devices((0,), "")


def test_worker_env_maps_devices_through_the_parent(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert worker_env(1, (1, 0))["CUDA_VISIBLE_DEVICES"] == "6,4"
    assert worker_env(1, None, cpu_only=True)["CUDA_VISIBLE_DEVICES"] == ""


def test_allocator_is_expandable_unless_the_user_chose(monkeypatch):
    env = {}
    allocator_env(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    allocator_env(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}  # the user's own setting stays
    env = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}  # ComfyUI's default on recent GPUs
    allocator_env(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    env = {"PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync,garbage_collection_threshold:0.6"}
    allocator_env(env)
    assert env == {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6"}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
    assert worker_env(1)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_stage_split_input(convert):
    assert convert.parse_stage_split("", "pipefusion") is None
    assert convert.parse_stage_split(" 10, 9 ", "pipefusion") == (10, 9)
    with pytest.raises(ValueError, match="write blocks per stage like 10,9"):
        convert.parse_stage_split("10;9", "pipefusion")
    with pytest.raises(ValueError, match="applies to pipefusion only"):
        convert.parse_stage_split("10,9", "distrifusion")


def test_auto_puts_the_lightest_rank_on_comfyuis_gpu(convert):
    # rank 0 holds the double blocks (heaviest), rank 1 the lightest: ComfyUI's GPU 0 goes to rank 1
    assert convert.place_auto((0, 1), 0, [900, 400]) == (1, 0)
    assert convert.place_auto((0, 1, 2, 3), 0, [900, 500, 300, 500]) == (1, 2, 0, 3)
    assert convert.place_auto((0, 1), None, [900, 400]) == (0, 1)  # ComfyUI on CPU
    assert convert.place_auto((0, 1), 3, [900, 400]) == (0, 1)  # ComfyUI's GPU not in the group
