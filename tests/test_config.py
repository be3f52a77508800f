"""Bad configurations are refused with the numbers and the fix, before any process group starts."""
from __future__ import annotations


import pytest

from comfy_pipefusion.bench import cli as bench
from comfy_pipefusion.config import ParallelConfig, SampleSpec


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown strategy 'ring'.*pipefusion"):
        ParallelConfig(strategy="ring", world_size=2)


def test_world_size_mismatches():
    with pytest.raises(ValueError, match="'serial' runs on exactly 1 rank, got world_size 2"):
        ParallelConfig(strategy="serial", world_size=2)
    with pytest.raises(ValueError, match="needs at least 2 ranks, got world_size 1"):
        ParallelConfig(strategy="pipefusion", world_size=1)
    with pytest.raises(ValueError, match=r"stage_split \[3, 3\] must give .* each of the 3 stages"):
        ParallelConfig(strategy="pipefusion", world_size=3, stage_split=(3, 3))


def test_too_many_patches_names_the_rows():
    cfg = ParallelConfig(strategy="pipefusion", world_size=2, patches=9)
    with pytest.raises(ValueError, match=r"9 patches .* only 8 \(height/16\); use at most 8"):
        cfg.check_image(8)
    ParallelConfig(strategy="pipefusion", world_size=2, patches=8).check_image(8)  # the limit itself is fine


def test_more_stages_than_blocks():
    with pytest.raises(ValueError, match="5 stages needs at least 5 blocks, the model has 4"):
        ParallelConfig(strategy="pipefusion", world_size=5).check_model(4)
    with pytest.raises(ValueError, match=r"stage_split \[1, 2\] covers 3 blocks, the model has 6"):
        ParallelConfig(strategy="pipefusion", world_size=2, stage_split=(1, 2)).check_model(6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(patches=-1), "patches must be 0"),
    (dict(warmup_steps=0), "warmup_steps must be at least 1"),
    (dict(text_stream="middle"), "unknown text_stream 'middle'"),
    (dict(balance="speed"), "unknown balance 'speed'"),
])
def test_bad_parallel_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(strategy="pipefusion", world_size=2, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=100), "height 100 must be a positive multiple of 16 .*96"),
    (dict(width=0), "width 0 must be a positive multiple of 16"),
    (dict(steps=0), "steps must be at least 1, got 0"),
    (dict(sampler="dpmpp_3m_sde"), "sampler 'dpmpp_3m_sde' is not implemented: choose one of euler, "),
    (dict(scheduler="kl_optimal"), "scheduler 'kl_optimal' is not implemented: choose one of simple, "),
    (dict(denoise=0.0), r"denoise 0.0 must be in \(0, 1\]"),
    (dict(cfg=-1.0), "cfg -1.0 must not be negative"),
])
def test_bad_sample_spec(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleSpec(**kwargs)


@pytest.mark.parametrize("argv, message", [
    (["--patches", "9"], "9 patches"),
    (["--world-size", "7"], "7 stages needs at least 7 blocks, the model has 6"),
    (["--strategies", "serial,tensor"], "unknown strategy 'tensor'"),
    (["--node-rank", "1"], "--node-rank and --rdzv-endpoint go with --nnodes > 1"),
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT, node rank 0's address"),
    (["--nnodes", "2", "--rdzv-endpoint", "10.0.0.1"], "rendezvous endpoint '10.0.0.1': give HOST:PORT"),
    (["--nnodes", "2", "--world-size", "3", "--rdzv-endpoint", "127.0.0.1:29500"],
     "--world-size 3 cannot be shared evenly by 2 machines"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29500"], "node rank 2 is not one of 0..1"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500", "--local-addr", "192.0.2.77"],
     "no network interface of this machine has the address 192.0.2.77"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500", "--link", "1gbit"], "give one"),
])
def test_bench_refuses_before_starting_anything(argv, message, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(bench, "run_jobs", lambda *a, **k: started.append(a))  # would start a group
    assert bench.main(["--preset", "tiny", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not started
