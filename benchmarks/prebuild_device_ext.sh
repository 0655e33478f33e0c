#!/usr/bin/env bash
# Build the extension here for a GPU machine's Python and torch, so that a device run can carry
# it and skip its own build (gpu_report.sh with GPAVATAR_PREBUILT=1).
#
#   bash benchmarks/prebuild_device_ext.sh [PYVER] [TORCH] [ARCH]     (defaults: 3.12 2.11.0 9.0)
#
# Makes a venv of Python PYVER (pyenv's, or pythonPYVER on the PATH) in $VENV (default
# /work/venv<PYVER without the dot>) holding torch==TORCH without its dependencies (only the
# headers and libraries matter; the CUDA libraries are borrowed from this checkout's .venv),
# copies the tracked and untracked-not-ignored files to $BUILD_DIR (default /tmp/prebuild<ver>)
# and builds there for TORCH_CUDA_ARCH_LIST=ARCH; the result is copied next to this checkout's
# own build, gpavatar/_C.cpython-<ver>-x86_64-linux-gnu.so (git ignores it: name it in the
# device call's `carry`).  A few minutes on 2 cores.
set -euo pipefail
PYVER="${1:-3.12}"
TORCH="${2:-2.11.0}"
ARCH="${3:-9.0}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${PYVER/./}"
VENV="${VENV:-/work/venv$TAG}"
BUILD_DIR="${BUILD_DIR:-/tmp/prebuild$TAG}"
HOST_SITE="$(ls -d "$REPO"/.venv/lib/python3*/site-packages | head -1)"
if [[ ! -d "$HOST_SITE/nvidia" ]]; then
    echo "no CUDA libraries in $HOST_SITE/nvidia: run make setup first" >&2
    exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    PY="$(command -v "python$PYVER" || true)"
    # a pyenv shim of a version that is installed but not active is found yet does not run
    if [[ -n "$PY" ]] && ! "$PY" -c "" 2> /dev/null; then PY=""; fi
    if [[ -z "$PY" ]] && command -v pyenv > /dev/null; then
        PY="$(PYENV_VERSION="$(pyenv versions --bare | grep "^$PYVER" | tail -1)" pyenv which python)"
    fi
    [[ -n "$PY" ]] || { echo "no Python $PYVER found" >&2; exit 1; }
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --no-deps "torch==$TORCH" numpy setuptools wheel typing_extensions sympy mpmath \
        filelock jinja2 markupsafe networkx fsspec
fi
SITE="$(ls -d "$VENV"/lib/python3*/site-packages | head -1)"
ln -sfn "$HOST_SITE/nvidia" "$SITE/nvidia"
LIBS="$(ls -d "$HOST_SITE"/nvidia/*/lib | tr '\n' ':')"
rm -rf "$BUILD_DIR" && mkdir -p "$BUILD_DIR"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp -d --parents -t "$BUILD_DIR")
cd "$BUILD_DIR"
LD_LIBRARY_PATH="$LIBS" TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-2}" FORCE_CUDA=1 \
    "$VENV/bin/python" setup.py build_ext --inplace > "$BUILD_DIR/build.log" 2>&1 \
    || { tail -20 "$BUILD_DIR/build.log" >&2; exit 1; }
SO="$(ls gpavatar/_C.cpython-"$TAG"-*.so)"
cp "$SO" "$REPO/gpavatar/"
echo "built $REPO/gpavatar/$(basename "$SO") (torch $TORCH, Python $PYVER, sm_${ARCH/./})"
