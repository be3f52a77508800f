"""Issue 17: the warm worker group belongs to the ComfyUI process (real server, real groups).

It survives prompts that do not use it under every cache mode (default, --cache-none, --cache-lru 2),
stops when ComfyUI frees memory (POST /free) or our Unload node runs, lives beside other plans' groups
(GET /pipefusion/groups lists them), stops after PIPEFUSION_IDLE_S, and every way it ends leaves no
process, zombie, segment or group directory. The wall times of the cold, warm and after-a-stock-prompt
jobs are printed (``-s``) as ``LIFECYCLE ...``.

One tiny SD3.5-medium-like checkpoint (width 192) serves both the stock KSampler (UNETLoader) and ours.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from comfy_pipefusion import transport
from comfy_pipefusion.models import family, sd3
from comfy_pipefusion.models.checkpoint_write import write_checkpoint

from comfy_helpers import error_message, group_states, run_prompt, running, start_server, wait_until, worker_pids
from launcher import GroupPlan, GroupRegistry, group_key, idle_seconds, pressure_index
from test_parity_comfy import SD3_CONFIG

FILE_A, FILE_B = "life-sd3-a.safetensors", "life-sd3-b.safetensors"
COND = {"tokens": 8, "width": 4096, "pooled_width": 2048, "guidance": 3.5, "seed": 0}
SIZE = 128
CACHES = {"cache-none": ("--cache-none",), "cache-lru-2": ("--cache-lru", "2")}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("life-models")
    model = sd3.build_meta(SD3_CONFIG)
    sd3.materialize(model, family.all_names(model), torch.device("cpu"), torch.float32, 0)
    write_checkpoint(folder / FILE_A, model.state_dict(), sd3.NAME, dict(model.config), dtype=torch.float32)
    os.link(folder / FILE_A, folder / FILE_B)  # another checkpoint to ComfyUI and to us: another group
    return folder


def serve(tmp_path_factory, models: Path, args=(), env=None):
    base, run_dir = tmp_path_factory.mktemp("life"), tmp_path_factory.mktemp("run")
    run_dir.chmod(0o700)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    for name in (FILE_A, FILE_B):
        os.link(models / name, base / "models" / "diffusion_models" / name)
    srv = start_server(base, run_dir, extra_env=env, args=args)
    srv.groups_dir = run_dir / f"comfy-pipefusion-{os.getuid()}"
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory, models):
    srv = serve(tmp_path_factory, models)
    yield srv
    srv.stop()


def pf_nodes(file: str, n: str, steps: int = 1, seed: int = 1, strategy: str = "pipefusion") -> dict:
    """Loader, sampler and SaveLatent with ids ``n``1.. ``n``3, on conditioning "c" and latent "l"."""
    return {
        f"{n}1": {"class_type": "PipeFusionDiTLoader",
                  "inputs": {"unet_name": file, "weight_dtype": "float32", "devices": "cpu:2", "strategy": strategy,
                             "patches": 2 if strategy == "pipefusion" else 0, "warmup_steps": 1}},
        f"{n}2": {"class_type": "PipeFusionKSampler",
                  "inputs": {"pipefusion_model": [f"{n}1", 0], "seed": seed, "steps": steps, "cfg": 1.0,
                             "sampler_name": "euler", "scheduler": "simple", "positive": ["c", 0],
                             "negative": ["c", 0], "latent_image": ["l", 0], "denoise": 1.0}},
        f"{n}3": {"class_type": "SaveLatent", "inputs": {"samples": [f"{n}2", 0], "filename_prefix": f"life/{n}"}},
    }


def common() -> dict:
    return {"c": {"class_type": "PipeFusionTestConditioning", "inputs": dict(COND)},
            "l": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}}


def pf_prompt(seed: int = 1, steps: int = 1, files=(FILE_A,), strategy: str = "pipefusion") -> dict:
    p = common()
    for i, f in enumerate(files):
        p.update(pf_nodes(f, "p" if i == 0 else f"q{i}", steps, seed, strategy))
    return p


def stock_prompt(seed: int = 1) -> dict:
    """A stock UNETLoader -> KSampler prompt on the same file: none of our nodes."""
    return {**common(),
            "s1": {"class_type": "UNETLoader", "inputs": {"unet_name": FILE_A, "weight_dtype": "default"}},
            "s2": {"class_type": "KSampler",
                   "inputs": {"model": ["s1", 0], "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                              "scheduler": "simple", "positive": ["c", 0], "negative": ["c", 0],
                              "latent_image": ["l", 0], "denoise": 1.0}},
            "s3": {"class_type": "SaveLatent", "inputs": {"samples": ["s2", 0], "filename_prefix": "life/stock"}}}


def ok(srv, prompt: dict, sampler: str | None = None) -> tuple[float, list]:
    """Run ``prompt``; with ``sampler``, check that this node ran (a progress message), not a cached copy."""
    t0 = time.monotonic()
    status, msgs = run_prompt(srv, prompt, timeout=300)
    assert status == "execution_success", (error_message(msgs), srv.log_tail(40))
    if sampler is not None:
        assert any(m["type"] == "progress" and m["data"].get("node") == sampler for m in msgs), msgs
    return time.monotonic() - t0, msgs


def zombies(srv) -> list[int]:
    return [p.pid for p in psutil.Process(srv.pid).children(recursive=True)
            if p.status() == psutil.STATUS_ZOMBIE]


def group_dirs(srv) -> list[Path]:
    return sorted(srv.groups_dir.glob("group-*"))


def listed(srv) -> list[dict]:
    return srv.get("/pipefusion/groups")["groups"]


def survives_a_stock_prompt(srv, label: str) -> None:
    """PipeFusion -> PipeFusion (warm) -> stock KSampler -> PipeFusion: the last runs on the same pids."""
    cold, _ = ok(srv, pf_prompt(seed=1), "p2")
    pids, dirs = worker_pids(srv.pid), group_dirs(srv)
    assert len(pids) == 2 and len(dirs) == 1
    warm, _ = ok(srv, pf_prompt(seed=2), "p2")
    ok(srv, stock_prompt(), "s2")
    assert worker_pids(srv.pid) == pids, "the stock prompt ended the warm group"
    after, msgs = ok(srv, pf_prompt(seed=3), "p2")
    print(f"\nLIFECYCLE {label}: 1-step job cold {cold:.2f} s, warm {warm:.2f} s, after a stock prompt "
          f"{after:.2f} s (same pids {pids})")
    assert worker_pids(srv.pid) == pids and group_dirs(srv) == dirs
    assert zombies(srv) == []
    # the status events name the group they are about, as the route does
    keys = {m["data"].get("group") for m in msgs if m["type"] == "pipefusion.status"}
    assert keys == {g["key"] for g in listed(srv)} and len(keys) == 1, keys


def test_lifecycle_group_survives_a_stock_prompt(server):
    survives_a_stock_prompt(server, "default cache")


def test_lifecycle_two_plans_are_two_groups_listed_by_the_route(server):
    """Two loaders of two checkpoints in one workflow: two groups, both warm, both listed; a rank that
    dies while idle is reaped (no zombie, no directory) before any prompt asks for its group."""
    ok(server, pf_prompt(seed=4, steps=2, files=(FILE_A, FILE_B)))
    groups = listed(server)
    assert sorted(g["key"] for g in groups) == [f"{FILE_A}|pipefusion|float32|cpu:2",
                                               f"{FILE_B}|pipefusion|float32|cpu:2"], groups
    for g in groups:
        assert g["state"] == "ready" and g["world_size"] == 2 and g["devices"] == "cpu" and len(g["pids"]) == 2
        assert all(r and r > 10 * 2**20 for r in g["rss_bytes_per_rank"]), g
        job = g["last_job"]
        assert job["wall_s"] > 0 and job["wait_s"] >= 0 and job["transfer_s"] > 0, job  # copies and sends, measured
        assert abs(job["compute_s"] + job["wait_s"] + job["transfer_s"] - job["wall_s"]) < 1e-6, job
    assert set(groups[0]["pids"]).isdisjoint(groups[1]["pids"])
    assert sorted(groups[0]["pids"] + groups[1]["pids"]) == worker_pids(server.pid)
    assert len(group_dirs(server)) == 2
    log = server.log_tail(200)
    assert "warm groups: " in log and FILE_B in log

    victim = next(g for g in groups if g["key"].startswith(FILE_B))
    ws = server.ws_connect(uuid.uuid4().hex)
    try:
        os.kill(victim["pids"][1], signal.SIGKILL)
        told = group_states(ws, victim["key"], "stopped", 20)  # the page hears it end, with why
    finally:
        ws.close()
    assert [s for s, _ in told] == ["failed", "stopped"] and told[0][1].startswith("the idle group "), told
    assert told[1][1] == f"failed: {told[0][1]}", told
    assert wait_until(lambda: len(group_dirs(server)) == 1 and not running(victim["pids"]), 20), group_dirs(server)
    assert wait_until(lambda: zombies(server) == [], 5), zombies(server)
    assert "the idle worker group" in server.log_tail(80)
    states = {g["key"]: g["state"] for g in listed(server)}
    assert victim["key"] not in states and list(states.values()) == ["ready"], states  # only live groups


@pytest.mark.slow
def test_lifecycle_free_stops_every_group_replace_and_unload_node_stop_one(server):
    ok(server, pf_prompt(seed=5, files=(FILE_A, FILE_B)))
    old = worker_pids(server.pid)
    assert len(old) == 4 and len(listed(server)) == 2
    t0 = time.monotonic()
    server.post_json("/free", {"unload_models": True})
    assert wait_until(lambda: not running(old) and not group_dirs(server), 15), (running(old), group_dirs(server))
    took = time.monotonic() - t0
    print(f"\nLIFECYCLE POST /free unload_models: 2 groups (4 ranks) stopped in {took:.2f} s")
    assert listed(server) == [] and zombies(server) == [] and transport.shm_segments(server.pid) == []
    log = server.log_tail(60)
    assert ("stopping 2 worker group(s) (ComfyUI unloads all models)" in log
            or log.count("PipeFusion: stopping idle worker group") == 2), log

    ok(server, pf_prompt(seed=6))  # a fresh group
    fresh = worker_pids(server.pid)
    assert len(fresh) == 2 and set(fresh).isdisjoint(old)

    # the same checkpoint with other settings replaces the group: nothing of the old one is left
    ok(server, pf_prompt(seed=6, strategy="distrifusion"), "p2")
    other = worker_pids(server.pid)
    assert len(other) == 2 and not running(fresh) and len(group_dirs(server)) == 1 and zombies(server) == []
    assert [g["key"] for g in listed(server)] == [f"{FILE_A}|distrifusion|float32|cpu:2"]

    unload = {"u1": pf_nodes(FILE_A, "p", strategy="distrifusion")["p1"],
              "u2": {"class_type": "PipeFusionUnload", "inputs": {"pipefusion_model": ["u1", 0]}}}
    ok(server, unload)
    assert not running(other) and not group_dirs(server) and zombies(server) == [] and listed(server) == []


def test_lifecycle_sigterm_mid_job_leaves_nothing(server):
    """ComfyUI gets SIGTERM while a job runs: the page hears "stopped" for the group before the server
    goes, and it exits leaving no process, zombie, segment or group directory behind (the last test on
    this server)."""
    seen: dict = {"msgs": []}

    def on_message(m):
        seen["msgs"].append(m)
        if m["type"] == "progress" and m["data"]["value"] >= 2 and "group" not in seen:
            seen["group"] = worker_pids(server.pid, agent=True) + worker_pids(server.pid)
            seen["procs"] = [psutil.Process(p) for p in seen["group"]]  # pid and start time: no reused pid
            seen["segments"] = transport.shm_segments(server.pid)
            os.kill(server.pid, signal.SIGTERM)  # ComfyUI's main process only, as `kill PID` does
    server_pid, proc = server.pid, server._proc
    try:  # the page may hear the prompt fail (the group is killed first) or the server just go away
        ended = run_prompt(server, pf_prompt(seed=7, steps=400), on_message=on_message, timeout=120)[0]
    except Exception as exc:
        ended = type(exc).__name__
    assert ended != "execution_success"
    assert proc.wait(30) == -signal.SIGTERM  # ComfyUI still ends as SIGTERM ends it
    told = [m["data"] for m in seen["msgs"] if m["type"] == "pipefusion.status"]
    assert told[-1] == {"state": "stopped", "detail": "ComfyUI is exiting",
                        "group": f"{FILE_A}|pipefusion|float32|cpu:2"}, told
    assert len(seen["group"]) == 3 and seen["segments"], seen
    assert wait_until(lambda: not running(seen["group"]), 10), running(seen["group"])
    # not even a zombie, once init has reaped them: the agent is SIGKILLed with its ranks and reaped by ComfyUI,
    # so the ranks' zombies are orphans that init (or a subreaper) reaps when it gets to it; checked at once, one
    # was sometimes still there. A process is told apart from a later one with its pid by its start time.
    assert wait_until(lambda: not [p for p in seen["procs"] if p.is_running()], 10), \
        [(p.pid, p.status(), p.ppid()) for p in seen["procs"] if p.is_running()]  # (pid, 'zombie', parent)
    assert transport.shm_segments(server_pid) == []
    assert group_dirs(server) == []


@pytest.fixture(scope="module", params=list(CACHES))
def cache_server(request, tmp_path_factory, models):
    srv = serve(tmp_path_factory, models, args=CACHES[request.param])
    srv.label = request.param
    yield srv
    srv.stop()


def test_lifecycle_group_survives_a_stock_prompt_other_caches(cache_server):
    survives_a_stock_prompt(cache_server, f"--{cache_server.label}")


# ------------------------------------------------------------------------------- the registry alone (no ComfyUI)

def test_lifecycle_idle_group_is_stopped_after_idle_s(tmp_path_factory):
    """PIPEFUSION_IDLE_S: a real group left idle is stopped by the registry's watcher: torchrun reaped,
    ranks gone, directory removed; one that keeps being used is not."""
    root = Path(tmp_path_factory.mktemp("pf-idle"))
    root.chmod(0o700)
    reg = GroupRegistry(root, idle_s=3.0, watch_every_s=0.2)
    try:
        plan = GroupPlan(world_size=2, key="idle")
        launcher = reg.launcher(plan, slot="x")
        group = launcher.ensure(plan)
        pids, proc, gdir = list(group.worker_pids), group.proc, group.dir
        assert reg.warm() == [group_key(plan)] == ["idle|cpu:2"]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.5:  # in use: last_used keeps moving, the group stays
            launcher.last_used = time.monotonic()
            time.sleep(0.2)
        assert launcher.group is group and proc.poll() is None
        assert wait_until(lambda: launcher.group is None, 10)
        assert 3.0 <= time.monotonic() - launcher.last_used < 8
        assert proc.returncode is not None and not gdir.exists() and not running(pids)
        assert reg.warm() == [] and reg.describe() == []
    finally:
        reg.close()


def test_lifecycle_replaced_plan_and_memory_pressure_decision(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("pf-slot"))
    root.chmod(0o700)
    reg = GroupRegistry(root)
    try:
        a, b, c = GroupPlan(2, key="m|pipefusion"), GroupPlan(2, key="m|distrifusion"), GroupPlan(2, key="n|pipefusion")
        la = reg.launcher(a, slot="m")
        assert reg.launcher(a, slot="m") is la
        reg.launcher(c, slot="n")
        reg.launcher(b, slot="m")  # the same checkpoint with other settings replaces a, not c
        assert sorted(reg.keys()) == ["m|distrifusion|cpu:2", "n|pipefusion|cpu:2"]
    finally:
        reg.close()
    cuda = lambda i=None: torch.device("cuda", i) if i is not None else torch.device("cuda")  # noqa: E731
    assert pressure_index(torch.device("cpu"), 2**40, 0) is None
    assert pressure_index(cuda(1), 8 * 2**30, 9 * 2**30) is None
    assert pressure_index(cuda(1), 8 * 2**30, 7 * 2**30) == 1
    assert pressure_index(cuda(), 1e30, 7 * 2**30) == 0


def test_lifecycle_stop_idle_leaves_a_busy_group(tmp_path_factory):
    """What POST /free does at once: stop the idle groups; one that runs a job (its lock held by the prompt
    thread) is left alone, to be stopped by unload_all_models after the prompt."""
    root = Path(tmp_path_factory.mktemp("pf-busy"))
    root.chmod(0o700)
    reg = GroupRegistry(root)
    try:
        plans = [GroupPlan(1, key="busy"), GroupPlan(1, key="idle")]
        busy, idle = (reg.launcher(p, slot=p.key) for p in plans)
        groups = [busy.ensure(plans[0]), idle.ensure(plans[1])]
        held, release = threading.Event(), threading.Event()

        def job():
            with busy.lock:
                held.set()
                release.wait(60)
        t = threading.Thread(target=job)
        t.start()
        held.wait(10)
        assert reg.stop_idle("test") == ["idle|cpu:1"]
        assert idle.group is None and not groups[1].dir.exists() and groups[1].proc.returncode is not None
        assert busy.group is groups[0] and groups[0].alive()
        release.set()
        t.join()
        assert reg.stop_idle("test") == ["busy|cpu:1"] and not groups[0].dir.exists()
    finally:
        release.set()
        reg.close()


@pytest.mark.parametrize("raw,expected", [("", None), ("0", None), ("90", 90.0), ("2.5", 2.5)])
def test_lifecycle_idle_setting(monkeypatch, raw, expected):
    monkeypatch.setenv("PIPEFUSION_IDLE_S", raw)
    assert idle_seconds() == expected


@pytest.mark.parametrize("raw", ["-1", "soon"])
def test_lifecycle_idle_setting_refused(monkeypatch, raw):
    monkeypatch.setenv("PIPEFUSION_IDLE_S", raw)
    with pytest.raises(ValueError, match=f"PIPEFUSION_IDLE_S={raw!r}: give the seconds"):
        idle_seconds()
