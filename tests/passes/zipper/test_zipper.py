"""The zipper method: exact at share 0, equal to a numpy reference of eq. 1 when lossy."""

import numpy as np
import onnx
import pytest

from conftest import MODELS, shipped
from onnxmerge.api import load_tasks, merge
from onnxmerge.data import load_dataset
from onnxmerge.errors import UsageError
from onnxmerge.graph.layers import layer_view
from onnxmerge.measure.evaluate import run_task
from onnxmerge.measure.metrics import count_macs
from onnxmerge.model.runtime import session
from onnxmerge.passes.common import normalise_passes
from onnxmerge.pipeline.checks import task_model
from onnxmerge.pipeline.manager import PassManager

PAIRS = {
    "lenet": ("lenet_mnist.onnx", "lenet_fashion.onnx"),
    "mobilenet": ("mobilenet_mnist.onnx", "mobilenet_fashion.onnx"),
    "resnet": ("resnet_mnist.onnx", "resnet_fashion.onnx"),
}
NAMES = ["mnist", "fashion"]


def paths(pair):
    return [shipped(MODELS / f) for f in PAIRS[pair]]


def data():
    return load_dataset(shipped(MODELS / "mnist_eval.npz")).x[:64]


def outputs(result, x):
    sess = session(result.model)
    return {t.name: run_task(sess, t, x) for t in result.info.tasks}


def reference(pair, k, depthwise="shared"):
    """Eq. 1 in numpy: each task's own (BN-folded) network with its first k layers' weights replaced
    by the average over the tasks (depthwise weights kept per task in the 'task' variant)."""
    state = PassManager(normalise_passes()).run(load_tasks(paths(pair), NAMES))
    views = [layer_view(t.graph) for t in state.tasks]
    consts = [t.graph.tensors() for t in state.tasks]
    for i in range(k):
        if depthwise == "task" and views[0][i].depthwise:
            continue
        for attr in ("weight", "bias"):
            names = [getattr(v[i], attr) for v in views]
            mean = np.mean([c[n].values for c, n in zip(consts, names)], axis=0)
            for c, n in zip(consts, names):
                c[n].values = mean.astype(np.float32)
    x = data()
    return {t.name: session(task_model(t, state)).run(None, {"input": x})[0] for t in state.tasks}


@pytest.mark.parametrize("pair", PAIRS)
def test_share_zero_reproduces_both_originals(pair):
    result = merge(paths(pair), method="zipper", names=NAMES, params={"share": 0}, verify_passes=True)
    x = data()
    got = outputs(result, x)
    for name, path in zip(NAMES, paths(pair)):
        ref = session(onnx.load(str(path))).run(None, {"input": x})[0]
        assert np.max(np.abs(got[name] - ref)) <= 1e-5 * max(1.0, np.max(np.abs(ref)))


@pytest.mark.parametrize("pair,k", [("lenet", 1), ("lenet", 2), ("lenet", 4), ("mobilenet", 3), ("mobilenet", 6)])
def test_lossy_share_equals_numpy_reference_of_eq1(pair, k):
    # --match none: the paper's plain average (the default matches channels first)
    result = merge(paths(pair), method="zipper", names=NAMES, params={"share": k, "match": "none"}, verify_passes=True)
    assert result.info.params["share"] == k
    got, ref = outputs(result, data()), reference(pair, k)
    for name in NAMES:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)
    # the shared backbone exists once: it is named shared/, and the MACs fell
    shared = [n for n in result.model.graph.node if n.name.startswith("shared/")]
    assert len([n for n in shared if n.op_type in ("Conv", "Gemm")]) == k
    packed = merge(paths(pair), method="pack", names=NAMES).model
    assert count_macs(result.model) < count_macs(packed)


def test_depthwise_task_variant_shares_parameters_not_compute():
    pair, k = "mobilenet", 6
    shared = merge(paths(pair), method="zipper", names=NAMES, params={"share": k, "match": "none"})
    task = merge(paths(pair), method="zipper", names=NAMES, params={"share": k, "depthwise": "task", "match": "none"})
    packed = merge(paths(pair), method="pack", names=NAMES).model
    got, ref = outputs(task, data()), reference(pair, k, depthwise="task")
    for name in NAMES:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)
    n_init = lambda m: sum(int(np.prod(i.dims)) for i in m.graph.initializer)  # noqa: E731
    assert n_init(shared.model) < n_init(task.model) < n_init(packed)
    assert count_macs(task.model) == count_macs(packed) > count_macs(shared.model)


def test_residual_block_is_shared_whole():
    result = merge(paths("resnet"), method="zipper", names=NAMES, params={"share": 2, "match": "none"})
    k = result.info.params["share"]
    assert k > 2  # layer 2 lies inside a residual block: the cut moved to the block's end
    assert any("rounded up" in n for n in result.state.notes)
    got, ref = outputs(result, data()), reference("resnet", k)
    for name in NAMES:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4)


def test_every_share_count_names_the_layers_it_shares():
    """Whatever --share asks, the count recorded is the layers shared: the merge equals eq. 1 on
    exactly those. (A block's 1x1 shortcut is listed after its convolutions and reads the block's
    input: a cut there shares the blocks before it only, and once recorded their count plus two.)"""
    n = len(layer_view(load_tasks(paths("resnet"), NAMES).tasks[0].graph))
    counts = set()
    for share in range(1, n - 1):
        result = merge(paths("resnet"), method="zipper", names=NAMES, params={"share": share, "match": "none"})
        k = result.info.params["share"]
        got, ref = outputs(result, data()), reference("resnet", k)
        for name in NAMES:
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-4, err_msg=f"share {share} -> {k}")
        counts.add(k)
    assert len(counts) >= 3


def test_layer_map_points_shared_layers_at_the_backbone():
    result = merge(paths("lenet"), method="zipper", names=NAMES, params={"share": 2})
    tensors = {o for n in result.model.graph.node for o in n.output}
    for task in result.info.tasks:
        merged = list(task.layers.values())
        assert all(m in tensors for m in merged)
        assert sum(m.startswith("shared/") for m in merged) == 2


def test_refusals():
    with pytest.raises(UsageError, match="same-architecture"):
        merge([MODELS / "lenet_mnist.onnx", MODELS / "vgg_fashion.onnx"], method="zipper")
    with pytest.raises(UsageError, match="same shape and type"):
        merge(paths("lenet"), method="zipper", separate_inputs=True)
    with pytest.raises(UsageError, match="at most 4 can be shared"):
        merge(paths("lenet"), method="zipper", params={"share": 5})
    with pytest.raises(UsageError, match="--depthwise both: choose from shared, task"):
        merge(paths("lenet"), method="zipper", params={"depthwise": "both"})


@pytest.mark.parametrize("pair,depthwise,match", [("lenet", "shared", "none"), ("mobilenet", "task", "none")])
def test_sweep_without_calibration_equals_direct_merges(pair, depthwise, match, tmp_path):
    """With no calibration steps, each step of the progressive sweep (warm-started from the previous
    model) is exactly the direct merge at that share: the warm start loses nothing."""
    from onnxmerge.model.contract import read_metadata
    from onnxmerge.passes import METHODS
    from onnxmerge.sweep import sweep, write_sweep

    evaluation = {"mnist": load_dataset(shipped(MODELS / "mnist_eval.npz")).take(64),
                  "fashion": load_dataset(shipped(MODELS / "fashion_eval.npz")).take(64)}
    params = {"depthwise": depthwise, "match": match}
    rows = sweep(METHODS["zipper"], paths(pair), NAMES, {}, evaluation, steps_per_layer=0, latency_budget_s=0.01,
                 progress=False, params=params)
    n_layers = len(layer_view(PassManager(normalise_passes()).run(load_tasks(paths(pair)[:1])).tasks[0].graph))
    assert [r["share"] for r in rows] == list(range(n_layers))
    assert all(a["compression"] <= b["compression"] for a, b in zip(rows, rows[1:]))
    assert rows[-1]["compression"] > 1.5 * rows[0]["compression"]
    x = data()
    for r in rows[1:]:
        direct = merge(paths(pair), method="zipper", names=NAMES, params=params | {"share": r["share"]})
        swept = session(r["model"])
        for task in read_metadata(r["model"]).tasks:
            np.testing.assert_allclose(run_task(swept, task, x), outputs(direct, x)[task.name], rtol=1e-5, atol=1e-5)
    if pair != "lenet":
        return
    written = write_sweep(rows, tmp_path / "lenet.onnx", keep=[2])
    assert sorted(p.name for p in written) == ["lenet_share2.onnx", "lenet_sweep.json", "lenet_sweep.md",
                                               "lenet_sweep.png"]
    assert "| 4 |" in (tmp_path / "lenet_sweep.md").read_text()


@pytest.mark.parametrize("pair", ["lenet", "mobilenet"])
def test_hungarian_matching_undoes_a_channel_shuffle_before_averaging(pair, tmp_path):
    """B = A with its hidden channels shuffled (same function, arbitrary channel order): zipping all
    layers with --match hungarian averages A with a re-ordered copy of itself and so reproduces A
    for both tasks; --match none averages unrelated channels and does not."""
    from test_match_channels import prepared, shuffle_hidden_channels

    a = shipped(MODELS / PAIRS[pair][0])
    state = prepared(a, a)
    shuffle_hidden_channels(state)
    shuffled = tmp_path / "shuffled.onnx"
    onnx.save(task_model(state.tasks[1], state), str(shuffled))
    x = data()
    ref = session(onnx.load(str(a))).run(None, {"input": x})[0]
    matched = merge([a, shuffled], method="zipper", names=NAMES, params={"match": "hungarian"}, verify_passes=True)
    plain = merge([a, shuffled], method="zipper", names=NAMES, params={"match": "none"})
    for name in NAMES:
        np.testing.assert_allclose(outputs(matched, x)[name], ref, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(outputs(plain, x)["mnist"] - ref)) > 0.1


def test_layer_loss_follows_matched_channel_order(tmp_path):
    """After channel matching, the per-layer calibration loss compares each task's layers with its
    original in the matched order: for B = A with shuffled channels, merged == both originals, so
    every loss term starts at zero."""
    from test_match_channels import prepared, shuffle_hidden_channels

    from onnxmerge.calibration.calibrate import CalibrationConfig, calibrate

    a = shipped(MODELS / "lenet_mnist.onnx")
    state = prepared(a, a)
    shuffle_hidden_channels(state)
    shuffled = tmp_path / "shuffled.onnx"
    onnx.save(task_model(state.tasks[1], state), str(shuffled))
    result = merge([a, shuffled], method="zipper", names=NAMES, params={"share": 2, "match": "hungarian"})
    assert result.info.tasks[1].channels and not result.info.tasks[0].channels
    ds = load_dataset(shipped(MODELS / "mnist_eval.npz")).take(64)
    out = calibrate(result.model, result.info, {"mnist": a, "fashion": shuffled}, {"mnist": ds, "fashion": ds},
                    CalibrationConfig(steps=2, batch_size=32, lr=1e-12, use_labels=False), progress=False)
    for h in out.history:
        assert h["layer"] < 1e-5 and h["kd"] < 1e-5, h
