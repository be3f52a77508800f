"""diffusers is pinned to the range the model tests pass on (issue 11): the pins and the load-time check agree."""
from __future__ import annotations

import logging
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from comfy_pipefusion.models import diffusers_range, flux
from comfy_pipefusion.models.diffusers_range import DiffusersVersionError, check

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_and_pyproject_pin_the_tested_range():
    want = diffusers_range.requirement()
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln.startswith("diffusers")]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert reqs == [want] and [d for d in deps if d.startswith("diffusers")] == [want]
    assert check() is None, f"the venv's diffusers {metadata.version('diffusers')} is outside {want}"


def test_versions_outside_the_range():
    lo, cap = diffusers_range.TESTED
    assert check(f"{lo[0]}.{lo[1]}.0") is None and check(f"{cap[0]}.{cap[1] - 1}.9") is None
    newer = check(f"{cap[0]}.{cap[1]}.0.dev0")
    assert newer and f"pip install \"{diffusers_range.requirement()}\"" in newer
    with pytest.raises(DiffusersVersionError, match=re.escape(diffusers_range.requirement())):
        check(f"{lo[0]}.{lo[1] - 1}.2")
    with pytest.raises(DiffusersVersionError, match="cannot read"):
        check("nightly")


def test_newer_diffusers_warns_at_build(monkeypatch, caplog):
    cap = diffusers_range.TESTED[1]
    monkeypatch.setattr(diffusers_range, "installed", lambda: f"{cap[0]}.{cap[1]}.1")
    with caplog.at_level(logging.WARNING, logger="comfy_pipefusion.models"):
        model = flux.build_meta(flux.PRESETS["tiny"]["config"])
    assert model is not None and any("is newer than" in r.getMessage() for r in caplog.records)
