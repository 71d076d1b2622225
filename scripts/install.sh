#!/usr/bin/env bash
# Installs what a fresh Debian machine (Python >= 3.11) lacks: FUSE 3 and the tools the benchmarks
# compare against, then this package with its extras. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(fuse3 libfuse3-dev pkg-config squashfs-tools squashfuse)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

python3 -m pip install --disable-pip-version-check -q -e ".[keras,examples,test,bench]"
