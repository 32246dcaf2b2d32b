#!/usr/bin/env python3
"""Write the small calibration subsets that ship with the example models.

Calibration must not see the evaluation data, so these come from the TRAIN splits (the shipped
`*_eval.npz` files come from the test splits): `onnxmerge/examples/fashion_calib.npz` (the first
1000 Fashion-MNIST training images) and `digits_calib.npz` (500 spoken-digit training recordings drawn
with seed 0), preprocessed exactly like the examples' training data (onnxmerge.data's defaults, which
the npz files record).

    python tools/make_calib_subsets.py        # needs ../shared/data (or $ONNXMERGE_DATA)
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "onnxmerge" / "examples"


def main() -> int:
    from onnxmerge.data import load_named, save_npz, shared_data_dir

    if shared_data_dir() is None:
        print("make_calib_subsets: ../shared/data not found (set ONNXMERGE_DATA)", file=sys.stderr)
        return 1
    save_npz(OUT / "fashion_calib.npz", load_named("fashion-mnist", "train", limit=1000))
    save_npz(OUT / "digits_calib.npz", load_named("fsdd", "train").subset(500, seed=0))
    for name in ("fashion_calib.npz", "digits_calib.npz"):
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
