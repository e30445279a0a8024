#!/usr/bin/env bash
# Sets up everything (venv, packages, dataset) and runs the test suite.
#   scripts/test.sh                                      the default suite (10-20 minutes on 2 cores)
#   scripts/test.sh --runslow                            also the slow tests
#   scripts/test.sh --runslow tests/test_distributed.py  any arguments but --help go to pytest
#   scripts/test.sh --help                               this text (pytest's options are listed
#                                                        by .venv/bin/python -m pytest --help)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/lib.sh"
usage_if_asked "$0" "$@" && exit 0
cd "$here/.."
bash scripts/setup_env.sh
bash scripts/fetch_fashion_mnist.sh
exec .venv/bin/python -m pytest -q "$@"
