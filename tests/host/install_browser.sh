#!/usr/bin/env bash
# Install what the browser tests (tests/test_browser.py) drive: Debian's chromium and playwright-core
# from npm (idempotent; well under a second when present).
#
#   bash tests/host/install_browser.sh [DEST]
#
# DEST (default ${PIPEFUSION_BROWSER_DIR:-$HOME/.cache/comfy-pipefusion/browser}) gets node_modules/
# with playwright-core, which never downloads a browser of its own: the tests launch /usr/bin/chromium.
# chromium comes from apt, which needs root (CI runs as root). Where it cannot be installed (not root,
# no apt, no npm) this says why and exits 0: the browser tests then skip with that reason.
set -uo pipefail

PLAYWRIGHT_CORE_VERSION=1.57.0
DEST=${1:-${PIPEFUSION_BROWSER_DIR:-$HOME/.cache/comfy-pipefusion/browser}}
CHROMIUM=${PIPEFUSION_CHROMIUM:-/usr/bin/chromium}
say() { echo "[install_browser] $*" >&2; }
export DEBIAN_FRONTEND=noninteractive

if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's chromium with apt-get"
    { apt-get install -y -q chromium >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; }; } ||
      { say "ERROR: apt-get install chromium failed"; exit 1; }
  else
    say "no $CHROMIUM and cannot install it (needs root and apt-get): the browser tests will skip"
  fi
fi

if [ -f "$DEST/node_modules/playwright-core/package.json" ] &&
   grep -q "\"version\": \"$PLAYWRIGHT_CORE_VERSION\"" "$DEST/node_modules/playwright-core/package.json"; then
  exit 0
fi
if ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing nodejs and npm with apt-get"
    apt-get install -y -q nodejs npm >/dev/null 2>&1 || { say "ERROR: apt-get install npm failed"; exit 1; }
  else
    say "no npm and cannot install it: the browser tests will skip"
    exit 0
  fi
fi
say "installing playwright-core $PLAYWRIGHT_CORE_VERSION into $DEST"
mkdir -p "$DEST"
[ -f "$DEST/package.json" ] || echo '{"name": "pipefusion-browser-tests", "private": true}' > "$DEST/package.json"
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$DEST" --no-audit --no-fund --silent \
  "playwright-core@$PLAYWRIGHT_CORE_VERSION" >&2 || { say "ERROR: npm install playwright-core failed"; exit 1; }
