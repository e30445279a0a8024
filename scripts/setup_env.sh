#!/usr/bin/env bash
# Creates .venv (if missing or broken) and installs capsnet with its test extras into it.
# Idempotent: a second run only checks that everything is in place.
# Where Python's venv module is missing (Debian and Ubuntu ship it as python3-venv),
# it is installed with apt-get when this runs as root or with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

venv_ok() { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }

install_venv_module() {
    command -v apt-get >/dev/null 2>&1 || return 1
    local sudo="" version
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || return 1
        sudo="sudo"
    fi
    version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    echo "installing Python's venv module (python$version-venv) with apt-get" >&2
    $sudo apt-get update -qq >/dev/null || true
    $sudo apt-get install -y -qq "python$version-venv" >/dev/null 2>&1 \
        || $sudo apt-get install -y -qq python3-venv >/dev/null
}

if ! venv_ok; then
    # A venv without pip (a first attempt where ensurepip was missing) is made again.
    rm -rf .venv
    if ! "$PY" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        install_venv_module || true
        "$PY" -m venv .venv || {
            echo "error: could not create .venv with $PY: install Python's venv module" \
                "(Debian/Ubuntu: apt-get install python3-venv) or set PYTHON to another interpreter" >&2
            rm -rf .venv
            exit 1
        }
    fi
fi
stamp=.venv/.capsnet-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch and torchvision are pinned to a matching pair (the default index's build
    # for the platform).
    .venv/bin/python -m pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
