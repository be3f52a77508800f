"""strategy=auto on a real ComfyUI server (issue 13): when auto picks a plan whose stage split differs from the
weights the warm group holds, the ranks read their weights again, and the page hears it as "loading" (the
`pipefusion.status` websocket events the badge reads), naming the plan, and the log says why. `pytest -k planner`.

The choice is made deterministic by the block probe cache (PIPEFUSION_PROBE_DIR, this server's own): after the
first job probed the blocks, the test rewrites the cached costs. Heavy compute at warm-up = steps makes a full
replica (DistriFusion, Ulysses) the fastest; compute next to nothing leaves the link to decide, where
PipeFusion, which sends one patch per hop instead of every layer's K/V, wins; at 2 ranks PipeFusion holds half
the model and the others all of it.
"""
from __future__ import annotations

import json
import re

import pytest

from comfy_helpers import error_message, flux_prompt, run_prompt, start_model_server

UNET = "tiny-flux.safetensors"
STEPS = 2
HEAVY = {"per_token": 1e-3, "per_pair": 0.0, "per_call": 0.0}
LIGHT = {"per_token": 1e-12, "per_pair": 0.0, "per_call": 0.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory, serial_model):
    probes = tmp_path_factory.mktemp("probes")
    srv = start_model_server(tmp_path_factory, serial_model, UNET, name="planner",
                             extra_env={"PIPEFUSION_PROBE_DIR": str(probes), "PIPEFUSION_LOG": "INFO"})
    srv.probes = probes
    yield srv
    srv.stop()


def _auto(server, seed: int) -> tuple[str, list[tuple[str, str]]]:
    """One auto prompt (a new seed: ComfyUI runs the sampler again); (the plan it ran, its status events)."""
    status, msgs = run_prompt(server, flux_prompt(UNET, STEPS, seed, strategy="auto", warmup=STEPS,
                                                  prefix=f"latents/auto{seed}"), timeout=300)
    assert status == "execution_success", (error_message(msgs), server.log_tail(40))
    events = [(m["data"]["state"], m["data"].get("detail", "")) for m in msgs if m["type"] == "pipefusion.status"]
    ready = [d for s, d in events if s == "ready" and d.startswith("last job:")]
    assert ready, events
    plan = re.match(r"last job: (\S+) x2 .*\(auto\)", ready[-1])
    assert plan, ready[-1]
    return plan.group(1), events


def _costs(server, cost: dict, per_rank: tuple[dict, ...] = ()) -> None:
    """Rewrite the cached block probe of the (one) model and size the prompts use: the group's costs, and
    each rank's reading (``per_rank``: cards that differ; the group's costs are then the slowest's)."""
    files = list(server.probes.glob("probe-*.json"))
    assert len(files) == 1, files
    raw = json.loads(files[0].read_text())
    raw["blocks"] = {kind: dict(cost) for kind in raw["blocks"]}
    raw["outside"] = 0.0
    raw["ranks"] = [{"blocks": {kind: dict(c) for kind in raw["blocks"]}, "outside": 0.0}
                    for c in per_rank or (cost, cost)]
    files[0].write_text(json.dumps(raw))


def test_planner_auto_switching_plans_reloads_with_a_loading_badge(server):
    """Three auto prompts on one warm group: whenever the plan's split changed (PipeFusion's half model against
    a full replica) the statuses say "loading" for that plan, and only then; the third prompt's switch to
    PipeFusion is forced by the costs, and the server log names the reload."""
    first, _ = _auto(server, 1)  # probes the blocks (and writes the cache)
    _costs(server, HEAVY)
    second, events2 = _auto(server, 2)
    assert second in ("distrifusion", "ulysses"), second
    _costs(server, LIGHT)
    third, events3 = _auto(server, 3)
    assert third == "pipefusion", third
    for before, plan, events in ((first, second, events2), (second, third, events3)):
        loading = [d for s, d in events if s == "loading"]
        if (before == "pipefusion") != (plan == "pipefusion"):  # the modules each rank holds change
            assert loading and any(plan in d for d in loading), (before, plan, events)
        else:
            assert not loading, (before, plan, events)
    assert loading  # the third prompt reloaded
    log = server.log_path.read_text(errors="replace")
    assert re.search(r"auto picked pipefusion x2 \S+ \S+, whose stage split differs", log), server.log_tail(40)


def test_planner_auto_sizes_pipefusion_stages_to_cards_that_differ(server):
    """Rank 0's card probed 4x as fast as rank 1's (heavy compute, where a full replica won with both alike):
    auto runs PipeFusion with more blocks on rank 0's stage, the group reloads for that split (the badge says
    so) and the prompt succeeds; the plan's label carries the split."""
    fast = {**HEAVY, "per_token": HEAVY["per_token"] / 4}
    if not list(server.probes.glob("probe-*.json")):  # run alone: a first prompt probes (and writes the cache)
        _auto(server, 4)
    _costs(server, HEAVY, per_rank=(fast, HEAVY))
    plan, events = _auto(server, 5)
    ready = [d for s, d in events if s == "ready" and d.startswith("last job:")][-1]
    split = re.search(r" S(\d+)/(\d+) ", ready)
    assert plan == "pipefusion" and split and int(split.group(1)) > int(split.group(2)), ready
    assert any("S" + split.group(1) in d for s, d in events if s == "loading"), events
