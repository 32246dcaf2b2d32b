"""mtz --tolerance (adaptive N_l): each layer shares the most pairs that keep every task within the
tolerance on its held-out data, measured on --validation where given."""

import subprocess
import sys

import pytest

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.data import Dataset, load_dataset
from onnxmerge.errors import UsageError
from onnxmerge.measure.evaluate import evaluate

LENETS = [str(shipped(MODELS / f)) for f in ("lenet_mnist.onnx", "lenet_fashion.onnx")]
NAMES = ["mnist", "fashion"]
SETS = {"mnist": "mnist_eval.npz", "fashion": "fashion_eval.npz"}


def data(first: int, last: int, labels: bool = True) -> dict:
    """Samples first..last of each task's shipped eval set (the calibration and validation sets are disjoint)."""
    sets = {n: load_dataset(shipped(MODELS / s)) for n, s in SETS.items()}
    return {n: Dataset(ds.x[first:last], ds.y[first:last] if labels else None, ds.source, ds.preprocessing)
            for n, ds in sets.items()}


def zip_adaptive(tolerance, validation=None, **params):
    return merge(LENETS, method="mtz", names=NAMES, calib=data(0, 200), validation=validation,
                 params={"tolerance": tolerance, "hessian_samples": 64, **params})


def test_merged_model_stays_within_tolerance_on_the_validation_data():
    held_out = data(200, 500)
    result = zip_adaptive(2.0, held_out)
    fig = result.info.fidelity["mtz"]
    got = evaluate(result.model, result.info, held_out, {t.name: t.original for t in result.state.tasks},
                   progress=False)
    for task, row in got.items():
        # the reference is the originals' accuracy on --validation, not on a split of --calib
        assert fig["original_accuracy_held_out"][task] == pytest.approx(row["original_accuracy"])
        assert 100 * (row["original_accuracy"] - row["accuracy"]) <= 2.0 + 1e-9, (task, row)
    layers = {r["layer"]: r for r in fig["layers"]}
    assert fig["trials"] >= len(layers)
    assert sum(r["shared"] for r in layers.values()) > 0  # a 2-point budget lets something be shared
    # the last layer's chosen trial is the merged model: its recorded accuracy is the one measured above
    assert fig["layers"][-1]["accuracy"] == pytest.approx({t: r["accuracy"] for t, r in got.items()})


def test_a_tolerance_of_everything_shares_up_to_the_share_ratio():
    fig = zip_adaptive(100.0, data(200, 300), share_ratio=0.5).info.fidelity["mtz"]
    assert fig["trials"] == len(fig["layers"])  # the first trial of every layer passes
    assert all(r["shared"] == round(0.5 * min(r["candidates"])) for r in fig["layers"])


def test_validation_needs_labels_and_the_tolerance():
    with pytest.raises(UsageError, match="--validation data needs labels"):
        zip_adaptive(1.0, data(200, 300, labels=False))
    args = [sys.executable, "-m", "onnxmerge", *LENETS, "-o", "unused.onnx", "--method", "mtz",
            "--calib", f"mnist={shipped(MODELS / 'mnist_eval.npz')}",
            "--validation", f"mnist={shipped(MODELS / 'mnist_eval.npz')}", "--names", "mnist,fashion"]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("onnxmerge: error: --validation: only with --method mtz --tolerance "
                                   "(the held-out data its choices are measured on)")

