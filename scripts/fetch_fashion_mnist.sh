#!/usr/bin/env bash
# Puts the Fashion-MNIST IDX files where capsnet looks for them, without network
# access to the dataset hosts: Debian ships them as a package. Elsewhere capsnet
# downloads them itself (data.download: true).
#   bash scripts/fetch_fashion_mnist.sh   installs dataset-fashion-mnist with apt-get (as root or
#                                         with sudo) unless /usr/share/datasets/fashion-mnist has it
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/lib.sh"
usage_if_asked "$0" "$@" && exit 0
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"  # never waits for a password
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "could not install dataset-fashion-mnist; capsnet will try to download the data" >&2
fi
