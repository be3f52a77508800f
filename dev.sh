#!/usr/bin/env bash
# Developer entry point: sets up .venv on first use (CPU torch pinned), then runs what you ask.
#   ./dev.sh bench [bench flags]   the benchmark (python -m comfy_pipefusion.bench)
#   ./dev.sh test [pytest flags]   the test suite
#   ./dev.sh setup                 only install
set -euo pipefail
cd "$(dirname "$0")"
VENV="${PIPEFUSION_VENV:-.venv}"
PY="$VENV/bin/python"

setup() {
    [ -x "$PY" ] || python3 -m venv "$VENV"
    local stamp="$VENV/.pipefusion-deps" want
    want="$(cat constraints.txt requirements.txt requirements-test.txt | sha256sum | cut -c1-16)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "dev.sh: installing torch (CPU build, pinned) and the requirements into $VENV" >&2
        "$PY" -m pip install -q -c constraints.txt torch
        "$PY" -m pip install -q -c constraints.txt -r requirements.txt -r requirements-test.txt
        echo "$want" > "$stamp"
    fi
    # The real ComfyUI server the integration tests drive (idempotent; under a second when present).
    PYTHON="$PY" bash tests/host/install_comfyui.sh >&2
    # Chromium and playwright-core for the browser tests (idempotent; instant when present). A failure
    # here is reported again, as a test failure, by the browser tests themselves.
    bash tests/host/install_browser.sh || echo "dev.sh: tests/host/install_browser.sh failed (exit $?)" >&2
}

cmd="${1:-}"
shift || true
case "$cmd" in
    setup) setup ;;
    bench) setup; exec "$PY" -m comfy_pipefusion.bench "$@" ;;
    test)
        setup
        set +e
        "$PY" -m pytest "$@"
        rc=$?
        [ $rc -eq 5 ] && echo "dev.sh: pytest collected no tests: that is a failure" >&2
        exit $rc ;;
    *) echo "usage: ./dev.sh {setup|bench|test} [args]" >&2; exit 2 ;;
esac
