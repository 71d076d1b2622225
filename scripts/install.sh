#!/usr/bin/env bash
# Installs what a fresh Debian machine (Python >= 3.11) lacks: FUSE 3 and the tools the benchmarks
# compare against, then this package with its extras. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc and the Python headers build pyfuse3 where no wheel fits; python3-venv: see below
debs=(fuse3 libfuse3-dev pkg-config squashfs-tools squashfuse gcc python3-dev python3-venv)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    # through env: sudo resets the environment, so a DEBIAN_FRONTEND set before it never reached apt-get
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# Debian's own Python refuses pip installs outside a virtual environment (PEP 668: "externally managed"):
# there, everything goes into .venv, which scripts/demo.sh and scripts/test.sh then use (scripts/env.sh)
py=python3
if python3 -c 'import os, sys, sysconfig; sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(
        os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    # a venv whose creation was interrupted (bin/python there, pip not yet) is made again from scratch
    if ! { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
        python3 -m venv --clear .venv
    fi
    py=.venv/bin/python
fi
"$py" -m pip install --disable-pip-version-check -q -e ".[keras,examples,test,bench]"
