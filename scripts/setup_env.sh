#!/usr/bin/env bash
# Creates .venv (if missing or broken) and installs capsnet with its test extras into it.
# Idempotent: a second run only checks that everything is in place (a venv of $PYTHON's
# version, importable packages, an install newer than pyproject.toml and this script).
# Where Python's venv module is missing (Debian and Ubuntu ship it as python3-venv),
# it is installed with apt-get when this runs as root or with sudo; so are a C++
# compiler and Python's headers, which compiled routing (torch.compile on a CPU) needs.
#   bash scripts/setup_env.sh                      python3's venv
#   PYTHON=python3.11 bash scripts/setup_env.sh    another interpreter
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
usage_if_asked "$0" "$@" && exit 0
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
    found="not found"
    if command -v "$PY" >/dev/null 2>&1; then
        found=$("$PY" -V 2>&1 || true)  # Python 2 prints its version on stderr
    fi
    echo "error: capsnet needs Python 3.10 or newer; $PY is ${found:-of unknown version}." \
        "Set PYTHON to another interpreter, e.g. PYTHON=python3.11 bash scripts/setup_env.sh" >&2
    exit 1
fi
version=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# A venv that works and was made by the same Python version as $PY.
venv_ok() {
    [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1 \
        && [ "$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$version" ]
}

apt_install() {  # apt_install PACKAGE...: as root or with sudo; returns 1 where neither works
    command -v apt-get >/dev/null 2>&1 || return 1
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || return 1
        sudo="sudo -n"  # never waits for a password
    fi
    $sudo apt-get update -qq >/dev/null 2>&1 || true
    $sudo apt-get install -y -qq -o DPkg::Lock::Timeout=120 "$@" >/dev/null 2>&1
}

install_venv_module() {
    echo "installing Python's venv module (python$version-venv) with apt-get" >&2
    apt_install "python$version-venv" || apt_install python3-venv
}

# torch.compile on a CPU builds C++ with g++ (or $CXX) against Python's headers.
build_tools_ok() {
    command -v "${CXX:-g++}" >/dev/null 2>&1 || return 1
    "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}

if ! venv_ok; then
    # A venv without pip (a first attempt where ensurepip was missing), or of another
    # Python version, is made again.
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
# Imported from outside the checkout, so that the source folder does not stand in for the install.
installed() {
    (cd / && "$OLDPWD/.venv/bin/python" -c 'import torch, torchvision, typer, yaml, tqdm, tensorboard, capsnet') \
        >/dev/null 2>&1
}
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup_env.sh -nt "$stamp" ] || ! installed; then
    # Checked here, with the packages, so that a machine where they cannot be had is
    # not asked again on every run.
    if ! build_tools_ok; then
        echo "installing a C++ compiler and Python's headers (g++, python$version-dev) with apt-get" >&2
        apt_install g++ "python$version-dev" || apt_install g++ python3-dev || true
        build_tools_ok || echo "warning: no C++ compiler (g++) or Python headers: training routes with" \
            "the eager kernels (same results, slower), and the tests of the compiled kernels fail" >&2
    fi
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch and torchvision are pinned to a matching pair (the default index's build
    # for the platform).
    .venv/bin/python -m pip install -q "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1"
    .venv/bin/python -m pip install -q -e ".[dev]"
    touch "$stamp"
fi
