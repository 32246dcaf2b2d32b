"""The same inputs, flags and seed give a byte-identical merged model (DESIGN.md, "The merged model").

Each method runs twice through the command line into two different files, whose sha256 must agree:
the model file holds no wall-clock timings (onnxmerge.model.contract.without_timings), and every random
choice (k-means initialisation, Hessian samples, calibration batches) is seeded. The settings are the
smallest that still exercise each method's random parts.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_cli_errors import run_cli

from conftest import EXAMPLES, MODELS, conv_bn_model, shipped

FASHION, DIGITS = EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx"
ROOT = Path(__file__).resolve().parents[1]
# the example models take different inputs (28x28 and 32x32); zipper and mtz share one input, so
# zipper runs on the LeNet pair of tests/models, and mtz, whose retraining after each layer is the
# slow part, on the two-layer models of conftest (one layer to zip, one retraining)
MNIST, FASHION_MNIST = MODELS / "lenet_mnist.onnx", MODELS / "lenet_fashion.onnx"


def subset(source: Path, folder: Path, n: int) -> Path:
    """The first `n` samples of a shipped .npz data set, as a file in `folder` (small calibration)."""
    with np.load(shipped(source)) as z:
        path = folder / f"{source.stem}_{n}.npz"
        np.savez(path, x=z["x"][:n], y=z["y"][:n])
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def argv_for(case: str, tmp_path: Path) -> list:
    """The merge command of one case, without -o."""
    if case == "pack":
        return [shipped(FASHION), shipped(DIGITS)]
    if case == "codebook":
        return [shipped(FASHION), shipped(DIGITS), "--method", "codebook", "--preset", "light", "--kmeans-init", "2"]
    if case == "calibration":  # pack, calibrated once (--method auto with labelled --calib would search)
        return [shipped(FASHION), shipped(DIGITS), "--method", "pack", "--steps", "4", "--batch-size", "8",
                "--calib", f"fashion_lenet={subset(EXAMPLES / 'fashion_calib.npz', tmp_path, 64)}",
                "--calib", f"digits_lenet={subset(EXAMPLES / 'digits_calib.npz', tmp_path, 64)}"]
    if case == "zipper":
        return [shipped(MNIST), shipped(FASHION_MNIST), "--method", "zipper", "--share", "2", "--names", "m,f"]
    assert case == "mtz"
    models = [tmp_path / f"tiny{k}.onnx" for k in range(2)]
    for k, path in enumerate(models):
        onnx.save(conv_bn_model(seed=k), str(path))
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=rng.standard_normal((64, 1, 8, 8)).astype(np.float32), y=rng.integers(0, 4, 64))
    return [*models, "--method", "mtz", "--share-ratio", "0.5", "--hessian-samples", "8", "--retrain-steps", "2",
            "--batch-size", "8", "--calib", f"tiny0={calib}", "--calib", f"tiny1={calib}"]


@pytest.mark.parametrize("case", ["pack", "codebook", "calibration", "zipper", "mtz"])
def test_same_inputs_flags_and_seed_give_identical_bytes(case, tmp_path, capsys):
    argv = argv_for(case, tmp_path)
    outputs = [tmp_path / "first.onnx", tmp_path / "second.onnx"]
    for out in outputs:
        code, _, err = run_cli(capsys, *argv, "-o", out, "--no-latency", "-q")
        assert code == 0, err
    assert sha256(outputs[0]) == sha256(outputs[1])


def other_hash_seed(names: list[str]) -> str:
    """A PYTHONHASHSEED that iterates the set of `names` in another order than PYTHONHASHSEED=1."""
    def order(seed: str) -> str:
        return subprocess.run([sys.executable, "-c", f"print(list(set({names!r})))"], capture_output=True,
                              text=True, check=True, env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
    first = order("1")
    return next(seed for seed in map(str, range(2, 100)) if order(seed) != first)


def _run_apart(argv: list, runs: list[tuple[str, str]], tmp_path: Path, stem: str) -> list[str]:
    """The sha256 of the file written by `onnxmerge argv` in one process per (hash seed, threads),
    run at once."""
    procs = {}
    for seed, threads in runs:
        out = tmp_path / f"{stem}_hashseed{seed}_threads{threads}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        procs[out] = subprocess.Popen([sys.executable, "-m", "onnxmerge", *map(str, argv), "-o", str(out)], cwd=ROOT,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for out, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return [sha256(out) for out in procs]


def test_separate_processes_with_other_hash_seeds_and_threads_give_identical_bytes(tmp_path):
    """Separate processes, not one process run twice: another PYTHONHASHSEED (the order of sets and
    dicts of strings: one is chosen that orders the set of the task names differently) and another
    number of threads (onnxruntime's, OpenMP's and MKL's) give the same file. Codebook exercises
    k-means (seeded, several initialisations) and the checks' onnxruntime runs; each process differs
    from the first in one factor, so a failure names its cause."""
    argv = [*argv_for("codebook", tmp_path), "--kmeans-init", "2", "--no-latency", "-q"]
    seed = other_hash_seed(["fashion_lenet", "digits_lenet"])
    first, other_seed, other_threads = _run_apart(argv, [("1", "1"), (seed, "1"), ("1", "2")], tmp_path, "merge")
    assert first == other_seed, "another PYTHONHASHSEED gave another file"
    assert first == other_threads, "another number of threads gave another file"


def test_separate_processes_with_other_hash_seeds_give_identical_calibrated_bytes(tmp_path):
    """Calibration in separate processes with other hash seeds gives the same file at the same number
    of threads. (Not across thread counts: PyTorch's CPU gradients of convolutions (oneDNN) and
    matrix products (MKL) sum in an order that depends on the threads, about 1e-9 apart; README,
    "Bad input and safety", says so.)"""
    argv = [*argv_for("codebook", tmp_path), "--steps", "4", "--batch-size", "8",
            "--calib", f"fashion_lenet={subset(EXAMPLES / 'fashion_calib.npz', tmp_path, 64)}",
            "--calib", f"digits_lenet={subset(EXAMPLES / 'digits_calib.npz', tmp_path, 64)}", "--no-latency", "-q"]
    seed = other_hash_seed(["fashion_lenet", "digits_lenet"])
    first, other_seed = _run_apart(argv, [("1", "2"), (seed, "2")], tmp_path, "calibrated")
    assert first == other_seed, "another PYTHONHASHSEED gave another calibrated file"


def test_timings_stay_out_of_the_model_but_in_the_report(tmp_path):
    """The k-means timings that make the codebook report are in the in-memory info the report is
    built from, and not in the file (a time never repeats, so it would break the test above)."""
    from onnxmerge.api import merge
    from onnxmerge.model.contract import read_metadata

    out = tmp_path / "m.onnx"
    result = merge([shipped(FASHION), shipped(DIGITS)], out, method="codebook", params={"preset": "light"})
    in_memory = result.info.fidelity["codebook_layers"]
    stored = read_metadata(onnx.load(str(out))).fidelity["codebook_layers"]
    assert all("kmeans_seconds" in g for g in in_memory)
    assert stored == [{k: v for k, v in g.items() if k != "kmeans_seconds"} for g in in_memory]
