"""Install comfy-pipefusion's requirements into the Python that runs this file (ComfyUI-Manager runs it
with ComfyUI's interpreter). torch is never installed or changed: the installed version is pinned."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    try:
        import torch
    except ImportError:
        print("comfy-pipefusion: torch is not installed in this Python; install ComfyUI first", file=sys.stderr)
        return 1
    req = Path(__file__).resolve().parent / "requirements.txt"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={torch.__version__}\n")
    cmd = [sys.executable, "-m", "pip", "install", "-r", str(req), "-c", pin.name]
    print("comfy-pipefusion:", " ".join(cmd))
    rc = subprocess.call(cmd)
    Path(pin.name).unlink(missing_ok=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
