"""LoRA-type adapters on the lean path: each rank applies the adapters to its own stage (kinds: the math,
keys: which weight a file's key names, apply: a stage's patching and undo)."""
from .apply import LoraSpec, StageAdapters, patch, read_entries, sync_model
from .keys import Target, aliases, owners

__all__ = ["LoraSpec", "StageAdapters", "Target", "aliases", "owners", "patch", "read_entries", "sync_model"]
