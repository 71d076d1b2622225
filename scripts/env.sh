# Sourced by scripts/demo.sh and scripts/test.sh after scripts/install.sh: where install.sh made a
# virtual environment (Debian's own Python), its python3 and mistiquefs come first on the PATH.
if [ -x .venv/bin/python ]; then
    PATH="$PWD/.venv/bin:$PATH"
    export PATH
fi
