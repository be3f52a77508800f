"""The ranks' meetings at the synchronous collectives of a bench run, against what the probe read.

    python tools/meetings.py BENCH.json ...

For each row whose last run met in all-to-alls (Ulysses and its lanes), from the ranks' own timings (the
bench's ``timeline``, comfy_pipefusion/timeline.py ``meetings``): how many meetings, how far apart the
ranks arrived (mean), how long the exchange took once the last had arrived (mean), the compute between two
meetings (median), and the group's loss to the slowest rank as a share of that compute, beside the
``straggle`` the group's lockstep probe read for the same run (``probed_link``), which the simulator paces
such plans by. A prediction that misses a Ulysses row by more than its transfer explains shows here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_pipefusion.timeline import meetings  # noqa: E402


def rows(report: dict) -> list[tuple[str, str, object, float | None]]:
    """(row name, channel, Meetings, probed straggle) of every row of ``report`` that met in all-to-alls."""
    out = []
    for row in report["results"]:
        ranks = row.get("timeline") or []
        for what, m in meetings(ranks).items():
            out.append((row["name"], what.split(" ", 1)[1], m, (row.get("probed_link") or {}).get("straggle")))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", type=Path, nargs="+", help="bench JSONs (--json)")
    args = ap.parse_args(argv)
    print("| report | row | channel | meetings | arrival spread | exchange | compute between | lost to the slowest "
          "| probed straggle |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in args.reports:
        try:
            found = rows(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 2
        for name, channel, m, probed in found:
            probed_s = "-" if probed is None else f"{probed:.1%}"
            print(f"| {path.stem} | {name} | {channel} | {m.count} | {m.spread * 1e3:.2f} ms "
                  f"| {m.transfer * 1e3:.2f} ms | {m.between * 1e3:.1f} ms | {m.straggle:.1%} | {probed_s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
