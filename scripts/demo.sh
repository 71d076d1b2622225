#!/usr/bin/env bash
# The main job: install, capture the bundled examples (scikit-learn pipeline variants over the NYC flights
# table, a CNN trained on scikit-learn's digits at three checkpoints) into runs/store, mount it on
# runs/mnt, and show it with ls and numpy.load. Unmount with: mistiquefs umount runs/mnt
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
store=runs/store
mnt=runs/mnt
# Something still mounted on $mnt (a live mount, or one whose daemon died, which `mountpoint -q` does not
# count) is unmounted before the capture work; `mistiquefs umount` detaches a dead mount lazily and fails
# (exit 5) on a busy live one or on a mount that is not mistiquefs, which ends the demo here.
if python3 -c 'import sys; from mistiquefs.fs.mount import mount_type
sys.exit(mount_type(sys.argv[1]) is None)' "$mnt"; then
    mistiquefs umount "$mnt"
fi
mkdir -p "$mnt"
python3 examples/capture_all.py "$store"
mistiquefs mount "$store" "$mnt"
echo "\$ ls $mnt"; ls "$mnt"
echo "\$ ls $mnt/cnn_e3"; ls "$mnt/cnn_e3"
echo "\$ ls $mnt/cnn_e3/conv1 | head"; (ls "$mnt/cnn_e3/conv1" || true) | head
python3 - "$mnt" <<'PY'
import sys
import numpy as np
mnt = sys.argv[1]
import os
for path in (f"{mnt}/cnn_e3/conv1/17.npy", f"{mnt}/cnn_e3/conv1/all.npy", f"{mnt}/flights_logreg/preprocess/all.npy",
             f"{mnt}/flights_logreg/model.predict_proba/all.npy"):
    if not os.path.exists(path):  # (a store captured before the demo kept probabilities)
        print(f"{path}: not in this store")
        continue
    a = np.load(path, mmap_mode="r")
    print(f"np.load({path!r}): shape {a.shape}, dtype {a.dtype}, mean {float(np.mean(a)):.4f}")
PY
echo "mounted on $mnt; unmount with: mistiquefs umount $mnt"
