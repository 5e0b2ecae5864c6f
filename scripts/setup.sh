#!/usr/bin/env bash
# Sets up distrib-rda on a fresh Debian/Ubuntu machine: the system packages FFCV needs to build,
# the embedded Fashion-MNIST dataset, a virtual environment in .venv, and the package itself.
# Safe to rerun: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_PACKAGES=(pkg-config g++ libopencv-dev libturbojpeg0-dev dataset-fashion-mnist)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if ! command -v apt-get >/dev/null; then
    echo "error: these system packages are missing and apt-get is unavailable: ${missing[*]}" >&2
    echo "  FFCV needs pkg-config, a C++ compiler, OpenCV and libturbojpeg headers to build;" >&2
    echo "  install them with your package manager, and put the Fashion-MNIST IDX files in" >&2
    echo "  /usr/share/datasets/fashion-mnist/ (or pass --data-root to a torchvision layout)." >&2
    exit 1
  fi
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  echo "Installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "Creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f $VENV/.installed || pyproject.toml -nt $VENV/.installed ]]; then
  echo "Installing distrib-rda and its dependencies into $VENV (first time: several minutes)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  touch "$VENV/.installed"
fi
echo "Ready: $VENV/bin/distrib-rda"
