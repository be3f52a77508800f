"""``python -m comfy_pipefusion.bench``: see cli.py."""
import torch

from .cli import main

if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
