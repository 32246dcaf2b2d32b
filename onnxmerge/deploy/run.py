"""Run a merged model with onnxruntime and numpy only: what a board needs (written by `onnxmerge deploy`).

    pip install onnxruntime numpy             # the runtime-only install: no onnxmerge, torch or scikit-learn
    python run.py                             # seeded random inputs; prints each output's shape and argmax
    python run.py INPUTS.npz --save OUT.npz   # your inputs (arrays named by the model's inputs), outputs saved
    python run.py INPUT.npy                   # a one-input model's input
    python run.py --model model.ort           # the ORT-format file, where `deploy --ort-format` wrote one

The model's ai.onnxmerge nodes (if any) run in libonnxmerge_kernels.so, which deploy put beside this
file when the model has them; a model without them runs in any onnxruntime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
LIBRARY = HERE / "libonnxmerge_kernels.so"


def session(model: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime session of `model` with onnxmerge's kernels registered where they are present."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if LIBRARY.is_file():
        options.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession, path: str | None) -> dict[str, np.ndarray]:
    """The arrays of `path` (.npz by input name, or .npy for a one-input model), else seeded random
    values (dynamic dimensions = 1)."""
    inputs = sess.get_inputs()
    if path and path.endswith(".npy"):
        if len(inputs) != 1:
            raise SystemExit(f"{path}: the model has {len(inputs)} inputs; give an .npz with one array per input")
        return {inputs[0].name: np.load(path).astype(np.float32)}
    if path:
        with np.load(path) as arrays:
            missing = [i.name for i in inputs if i.name not in arrays]
            if missing:
                raise SystemExit(f"{path}: no array for the model's input(s) {', '.join(missing)}")
            return {i.name: arrays[i.name].astype(np.float32) for i in inputs}
    rng = np.random.default_rng(0)
    return {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
            for i in inputs}


def main() -> None:
    """Run the model once and print (and optionally save) its outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", nargs="?", help=".npz of arrays by input name, or .npy for a one-input model "
                                                 "(default: seeded random)")
    parser.add_argument("--model", default=str(HERE / "model.onnx"), help="model file (default model.onnx here)")
    parser.add_argument("--save", metavar="OUT.npz", help="save the outputs, by name")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    args = parser.parse_args()
    sess = session(Path(args.model), args.threads)
    outputs = sess.run(None, feeds(sess, args.input))
    names = [o.name for o in sess.get_outputs()]
    for name, y in zip(names, outputs):
        print(f"{name}: shape {list(y.shape)}, argmax {y.reshape(len(y), -1).argmax(axis=1).tolist()}")
    if args.save:
        np.savez(args.save, **dict(zip(names, outputs)))


if __name__ == "__main__":
    main()
