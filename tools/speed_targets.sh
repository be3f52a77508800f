#!/usr/bin/env bash
# The speed targets of the exact methods and the planner, measured by the bench on a QUIET machine (nothing else
# running: every figure is a wall time), one bench after another; each writes OUT/<name>.json and .log.
#   bash tools/speed_targets.sh OUT            (root for the --link cells; ~30 min on 2 cores for the 512^2 grid)
# 1. CFG split on a true-CFG job and our Ulysses beside diffusers' (mid, cfg 4.5)
# 2. PipeFusion, DistriFusion and Ulysses over a 1 Gbit/s link (mid, 28 steps)
# 3. auto against every fixed plan: steps 4 and 28 x cfg 1 and 4.5 x shared memory and 1 Gbit/s, at 512^2
#    (SIZES="512 1024" adds the 1024^2 half, hours on CPUs); each cell 3 rounds of 1 run per plan
#    (bench --rounds): on a machine whose speed drifts, every plan's runs from every stretch of the cell;
#    3 runs per round at 512^2 and 4 steps (runs of about 1 s), 1 round at 1024^2 and 28 steps (runs of
#    50-200 s: 20-35 min per cell as it is)
# PARTS="3" runs only part 3 (default "1 2 3").
set -euo pipefail
OUT="${1:?usage: tools/speed_targets.sh OUT_DIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PIPEFUSION_VENV:-.venv}/bin/python"
bench() { local name="$1"; shift; "$PY" -m comfy_pipefusion.bench "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
          tail -n 12 "$OUT/$name.log"; }
PARTS="${PARTS:-1 2 3}"
part() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
part 1 && bench cfg-mid --preset mid --steps 8 --cfg 4.5 --strategies serial,cfg,ulysses --peers diffusers-ulysses
part 2 && bench link-1gbit-mid --preset mid --steps 28 --link 1gbit --strategies serial,pipefusion,distrifusion,ulysses
part 3 || exit 0
for size in ${SIZES:-512}; do for steps in 4 28; do for link in shm 1gbit; do for cfg in 1 4.5; do
    strategies=serial,pipefusion,distrifusion,ulysses,auto  # pipefusion: M = 2 and 4 (--patches)
    [ "$cfg" != 1 ] && strategies="$strategies,cfg"
    link_args=(); [ "$link" != shm ] && link_args=(--link "$link")
    rounds=3; repeats=1
    [ "$size" = 512 ] && [ "$steps" = 4 ] && repeats=3
    [ "$size" != 512 ] && [ "$steps" = 28 ] && rounds=1
    bench "auto-$size-s$steps-$link-cfg$cfg" --preset small --height "$size" --width "$size" --steps "$steps" \
        --cfg "$cfg" "${link_args[@]}" --strategies "$strategies" --patches 2,4 --rounds "$rounds" --repeats "$repeats"
done; done; done; done
