"""The benchmark: ``python -m comfy_pipefusion.bench`` (cli.py), the timed runs of a job file (timing.py,
run by the worker's ``--jobs`` mode) and the turns that keep serial and the group from being timed side by
side (turns.py). Importing the package imports nothing of its modules."""
