"""Acceptance of `pack` on real trained models and real evaluation data: outputs equal the originals'.

The models are trained by tools/train_models.py on MNIST / Fashion-MNIST / spoken digits and ship in
tests/models and onnxmerge/examples, with evaluation subsets of the real test splits.
"""

import numpy as np
import onnx
import pytest

from conftest import EXAMPLES, MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.data import load_dataset
from onnxmerge.measure.evaluate import run_original, run_task
from onnxmerge.model.runtime import session
from onnxmerge.pipeline.checks import EXACT_TOL

PAIRS = {
    "example pair": (EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx",
                     EXAMPLES / "fashion_eval.npz", EXAMPLES / "digits_eval.npz"),
    "lenet + vgg": (MODELS / "lenet_mnist.onnx", MODELS / "vgg_fashion.onnx",
                    MODELS / "mnist_eval.npz", MODELS / "fashion_eval.npz"),
    "mobilenet pair": (MODELS / "mobilenet_mnist.onnx", MODELS / "mobilenet_fashion.onnx",
                       MODELS / "mnist_eval.npz", MODELS / "fashion_eval.npz"),
    "resnet pair": (MODELS / "resnet_mnist.onnx", MODELS / "resnet_fashion.onnx",
                    MODELS / "mnist_eval.npz", MODELS / "fashion_eval.npz"),
}


@pytest.mark.parametrize("pair", PAIRS, ids=str)
def test_pack_equals_originals_on_real_data(pair, tmp_path):
    a, b, data_a, data_b = (shipped(p) for p in PAIRS[pair])
    result = merge([a, b], tmp_path / "packed.onnx", method="pack", names=["a", "b"], verify_passes=True)
    merged = session(onnx.load(str(tmp_path / "packed.onnx")), optimize=True)
    for task, model, data in zip(result.info.tasks, (a, b), (data_a, data_b)):
        x = load_dataset(data).x
        got = run_task(merged, task, x)
        ref = run_original(session(onnx.load(str(model)), optimize=True), x)
        diff = float(np.max(np.abs(got - ref)))
        # float rounding, relative to the logits' magnitude (up to ~40 here): folding BatchNorm
        # reorders float32 arithmetic, as onnxruntime's own BN fusion does (the original model alone
        # differs by ~2e-5 between onnxruntime's optimisation levels)
        scale = max(1.0, float(np.max(np.abs(ref))))
        assert diff <= EXACT_TOL * scale, f"{pair}, task {task.name}: max abs difference {diff:.3g} (scale {scale:.3g})"
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_real_models_exercise_the_normalisation():
    """The shipped models carry BatchNormalization (the exporter kept it); a method that shares
    layers folds all of it (zipper sharing nothing here), pack leaves it to onnxruntime."""
    for name in ("lenet_mnist", "mobilenet_mnist", "resnet_mnist"):
        ops = {n.op_type for n in onnx.load(str(shipped(MODELS / f"{name}.onnx"))).graph.node}
        assert "BatchNormalization" in ops, name
    pair = [MODELS / "resnet_mnist.onnx", MODELS / "resnet_fashion.onnx"]
    # the tasks' layers as merged (unfused: fusing the two residual nets' Adds would leave 2 of 4)
    ops = [n.op_type for n in merge(pair, method="zipper", params={"share": 0}, fuse_branches="off").model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Add") >= 4  # residual Adds stay
    assert "BatchNormalization" in [n.op_type for n in merge(pair, method="pack").model.graph.node]


def test_lenet_vgg_alignment_is_strictly_increasing_and_printed(capsys):
    from onnxmerge.cli import main

    result = merge([MODELS / "lenet_mnist.onnx", MODELS / "vgg_fashion.onnx"], method="pack")
    pairs = result.info.fidelity["alignment"][0]["pairs"]
    assert len(pairs) >= 3
    assert all(i1 > i0 and j1 > j0 for (i0, j0), (i1, j1) in zip(pairs, pairs[1:]))
    assert main(["inspect", str(MODELS / "lenet_mnist.onnx"), str(MODELS / "vgg_fashion.onnx")]) == 0
    out = capsys.readouterr().out
    assert f"alignment (dp): {len(pairs)} pairs" in out
    for i, j in pairs:
        assert any(line.split()[:1] == [str(i)] and f"<->  {j}" in line for line in out.splitlines()), (i, j)


def test_mobilenet_layers_are_depthwise():
    from onnxmerge.api import load_tasks
    from onnxmerge.graph.layers import layer_view
    from onnxmerge.passes.common import normalise_passes
    from onnxmerge.pipeline.manager import PassManager

    state = PassManager(normalise_passes()).run(load_tasks([MODELS / "mobilenet_mnist.onnx"]))
    layers = layer_view(state.tasks[0].graph)
    assert sum(l.depthwise for l in layers) >= 3
    assert {l.activation for l in layers if l.kind == "conv"} == {"ReLU6"}


def test_example_pair_on_full_test_splits(tmp_path):
    """Where ../shared/data exists (CI): the packed example pair on the whole real test splits keeps
    each model's recorded accuracy exactly and agrees with the originals on every sample."""
    import json

    from onnxmerge.data import load_named, shared_data_dir
    from onnxmerge.measure.evaluate import evaluate

    if shared_data_dir() is None:
        pytest.skip("../shared/data not found: full-dataset test skipped")
    meta = json.loads((EXAMPLES / "models.json").read_text())["models"]
    result = merge([EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx"], method="pack",
                   names=["fashion_lenet", "digits_lenet"])
    data = {"fashion_lenet": load_named("fashion-mnist", "test"), "digits_lenet": load_named("fsdd", "test")}
    originals = {n: EXAMPLES / meta[n]["file"] for n in data}
    res = evaluate(result.model, result.info, data, originals, progress=False)
    for name, r in res.items():
        assert r["n"] == meta[name]["accuracy"]["test_samples"]
        assert r["agreement"] == 1.0
        assert r["accuracy"] == r["original_accuracy"] == pytest.approx(meta[name]["accuracy"]["test_full"], abs=1e-4)
