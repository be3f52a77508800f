"""A rank reads a checkpoint's header once and builds its meta model once per source (issue 11): the
structure ModelCache keeps for admission is what the load fills a copy of."""
from __future__ import annotations

import torch

from comfy_pipefusion.config import ParallelConfig
from comfy_pipefusion.models import checkpoint, flux
from comfy_pipefusion.parallel.plan import ModelSource, load_rank_model
from comfy_pipefusion.engine import ModelCache


def test_header_read_and_meta_built_once_per_rank(tmp_path, monkeypatch):
    whole, _ = load_rank_model(ModelSource(preset="tiny"), ParallelConfig("serial", 1), 0, torch.device("cpu"),
                               torch.float32)
    checkpoint.save_checkpoint(whole, tmp_path / "t.safetensors")
    source = ModelSource(checkpoint=str(tmp_path / "t.safetensors"))
    counts = {"header": 0, "build": 0}
    read_header, build_meta = checkpoint.read_header, flux.build_meta

    def counted(name, fn):
        def wrapper(*args, **kw):
            counts[name] += 1
            return fn(*args, **kw)
        return wrapper
    monkeypatch.setattr(checkpoint, "read_header", counted("header", read_header))
    monkeypatch.setattr(flux, "build_meta", counted("build", build_meta))
    cache, cfg = ModelCache(torch.device("cpu")), ParallelConfig("pipefusion", 2)
    assert cache.holds(source, cfg, 1, torch.float32) == (False, 0)  # admission asks first (engine.admit)
    model, blocks = cache.get(source, cfg, 1, torch.float32)
    assert counts == {"header": 1, "build": 1}
    _, _, meta = cache.describe(source)
    assert all(p.is_meta for p in meta.parameters())  # the kept structure stays meta: the load filled a copy
    held = {n for n, p in model.named_parameters() if not p.is_meta}
    assert held and all(n.startswith(("single_transformer_blocks", "time_text_embed", "norm_out", "proj_out"))
                        for n in held)  # the last stage of two
    for name, p in model.named_parameters():
        if not p.is_meta:
            assert torch.equal(p, whole.get_parameter(name)), name
    assert blocks and cache.holds(source, cfg, 1, torch.float32) == (True, 0)
