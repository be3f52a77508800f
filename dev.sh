#!/usr/bin/env bash
# Developer entry point: sets up .venv on first use (CPU torch pinned), then runs what you ask.
#   ./dev.sh demo [demo flags]     README's main job: the built-in trained model, every strategy, a PNG grid
#   ./dev.sh bench [bench flags]   the benchmark (python -m comfy_pipefusion.bench)
#   ./dev.sh train [train flags]   retrain the built-in model and its judge (tools/train_builtin.py)
#   ./dev.sh test [pytest flags]   the test suite (also installs pytest and the ComfyUI test host)
#   ./dev.sh setup                 only install (everything the tests need)
# demo, bench and train install only torch and requirements.txt; the test host is for the tests alone.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${PIPEFUSION_VENV:-.venv}"
PY="$VENV/bin/python"

install() {  # install STAMP FILES...: torch (CPU build, pinned) and these requirement files, once per content
    local stamp="$VENV/$1" want
    shift
    [ -x "$PY" ] || python3 -m venv "$VENV"
    want="$(cat constraints.txt "$@" | sha256sum | cut -c1-16)"
    [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && return 0
    echo "dev.sh: installing torch (CPU build, pinned) and $* into $VENV" >&2
    "$PY" -m pip install -q -c constraints.txt torch
    "$PY" -m pip install -q -c constraints.txt $(printf -- '-r %s ' "$@")
    echo "$want" > "$stamp"
}

setup() {  # everything the tests need
    install .pipefusion-deps requirements.txt requirements-test.txt
    # The real ComfyUI server the integration tests drive (idempotent; under a second when present).
    PYTHON="$PY" bash tests/host/install_comfyui.sh >&2
    # Chromium and playwright-core for the browser tests (idempotent; instant when present). A failure
    # here is reported again, as a test failure, by the browser tests themselves.
    bash tests/host/install_browser.sh || echo "dev.sh: tests/host/install_browser.sh failed (exit $?)" >&2
}

setup_main() {  # what demo, bench and train need: torch and requirements.txt (a test set-up covers it)
    local full
    full="$(cat constraints.txt requirements.txt requirements-test.txt | sha256sum | cut -c1-16)"
    [ "$(cat "$VENV/.pipefusion-deps" 2>/dev/null)" = "$full" ] && return 0
    install .pipefusion-deps-main requirements.txt
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    demo) setup_main; exec "$PY" -m comfy_pipefusion.demo "$@" ;;
    bench) setup_main; exec "$PY" -m comfy_pipefusion.bench "$@" ;;
    train) setup_main; exec "$PY" tools/train_builtin.py "$@" ;;
    test)
        setup
        set +e
        "$PY" -m pytest "$@"
        rc=$?
        [ $rc -eq 5 ] && echo "dev.sh: pytest collected no tests: that is a failure" >&2
        exit $rc ;;
    *) echo "usage: ./dev.sh {demo|bench|train|test|setup} [args]" >&2; exit 2 ;;
esac
