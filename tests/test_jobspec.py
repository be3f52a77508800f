"""The Job type (issue 11): its wire form is JSON that reads back to the same Job, carries the whole plan,
and a bad field is refused by ``from_wire`` with a message that names it."""
from __future__ import annotations

import json

import pytest

from comfy_pipefusion.adapters import LoraSpec
from comfy_pipefusion.config import ParallelConfig, SampleSpec
from comfy_pipefusion.jobspec import INPUT_KEYS, Job, TensorKey
from comfy_pipefusion.parallel.plan import ModelSource


def test_job_wire_round_trip_keeps_the_whole_plan_and_the_spec():
    par = ParallelConfig(strategy="pipefusion", world_size=2, patches=3, warmup_steps=2, stage_split=(1, 1),
                         text_stream="every_patch", balance="memory")
    job = Job(ModelSource(checkpoint="/m/flux.safetensors"), par,
              SampleSpec(height=64, width=96, steps=3, seed=7, sampler="dpmpp_2m", cfg=4.0, shift=2.0),
              model_stamp="1-2-3", adapters=(LoraSpec("/l/a.safetensors", 0.8, "9"), LoraSpec("/l/b.safetensors", -1)))
    wire = json.loads(json.dumps(job.to_wire()))  # JSON values only
    assert wire["parallel"]["text_stream"] == "every_patch" and wire["parallel"]["stage_split"] == [1, 1]
    assert Job.from_wire(wire, 2) == job


def test_job_from_wire_fills_the_group_size_and_a_presets_defaults():
    job = Job.from_wire({"model": {"preset": "tiny"}, "parallel": {"strategy": "distrifusion"},
                         "sample": {"steps": 2}}, world_size=4)
    assert job.parallel.world_size == 4 and job.sample.steps == 2
    assert (job.sample.height, job.sample.width) == (128, 128)  # the preset's size


def test_job_test_sampler_travels_by_name():
    class Probe:  # stands for a Sampler subclass given by --test-samplers
        name = "probe"

    wire = {"model": {"preset": "tiny"}, "parallel": {"strategy": "serial"}, "sample": {"sampler": "probe"}}
    job = Job.from_wire(wire, 1, {"probe": Probe})
    assert job.sample.sampler is Probe and job.to_wire()["sample"]["sampler"] == "probe"


@pytest.mark.parametrize("wire, match", [
    ({"model": {"preset": "tiny"}, "prompt": "x"}, r"job 'j' has unknown key\(s\) prompt; the keys are name"),
    ({"model": {"preset": "tiny", "path": "x"}}, r"field model of job 'j' has unknown key\(s\) path"),
    ({"model": {"preset": "tiny"}, "parallel": {"patchez": 2}}, r"field parallel of job 'j' .* patchez"),
    ({"model": {"preset": "tiny"}, "sample": {"step": 2}}, r"field sample of job 'j' .* step; the keys"),
    ({"model": {"preset": "tiny"}, "parallel": {"world_size": 3}}, r"asks for world_size 3 but the group has 2"),
    ({"model": {"preset": "tiny"}, "parallel": [1]}, r"field parallel must be a JSON object, got list"),
    ({"model": {"preset": "tiny"}, "sample": {"steps": "4"}}, r"field sample has a value of the wrong type"),
    ({"model": {"preset": "tiny"}, "sample": {"steps": 0}}, r"steps must be at least 1, got 0"),
    ({"model": {"preset": "tiny"}, "repeats": 0}, r"repeats must be at least 1 .*, got 0 and 0"),
    ({"model": {"preset": "tiny"}, "warmup_runs": -1}, r"warmup_runs at least 0, got 1 and -1"),
    ({"model": {"preset": "tiny"}, "warmup_runs": 1.5}, r"warmup_runs must be an integer, got 1.5"),
    ({"model": {}}, r"either a preset or a checkpoint path"),
    ({"model": {"preset": "tiny"}, "adapters": {"path": "x"}}, r"adapters must be a list of objects"),
    ({"model": {"preset": "tiny"}, "adapters": [{"path": "x", "strength": 1, "alpha": 2}]},
     r"an adapter of job 'j' has unknown key\(s\) alpha"),
    ({"model": {"preset": "tiny"}, "adapters": [{"path": "x", "strength": "1"}]}, r"LoRA x: strength must be a number"),
])
def test_job_from_wire_names_the_bad_field(wire, match):
    with pytest.raises(ValueError, match=match):
        Job.from_wire({"name": "j", **wire}, world_size=2)


def test_job_tensor_keys_are_the_wire_names():
    assert json.dumps({TensorKey.TXT: 1}) == '{"txt": 1}'
    assert INPUT_KEYS == {"txt", "pooled", "neg_txt", "neg_pooled", "mid_txt", "mid_pooled", "latent", "noise", "mask",
                          "sigmas"}


def test_job_weight_update_travels_and_is_checked():
    """The MODEL path's weight update (a file of changed weights) survives the wire; a non-path is refused."""
    wire = {"model": {"checkpoint": "/x.safetensors"}, "parallel": {"strategy": "pipefusion"},
            "sample": {}, "weight_update": "/dev/shm/w.safetensors"}
    job = Job.from_wire(wire, world_size=2)
    assert job.weight_update == "/dev/shm/w.safetensors"
    assert Job.from_wire(job.to_wire(), world_size=2) == job
    with pytest.raises(ValueError, match="weight_update must be a file path"):
        Job.from_wire({**wire, "weight_update": 3}, world_size=2)
