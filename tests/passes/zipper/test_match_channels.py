"""MatchChannelsPass: function preserved, a known permutation recovered, similarity up, declines, idempotent."""

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from conftest import MODELS, init, make_model, shipped
from onnxmerge.api import load_tasks
from onnxmerge.passes.common import normalise_passes
from onnxmerge.passes.common.align_layers import AlignLayersPass
from onnxmerge.passes.zipper.match_channels import MatchChannelsPass
from onnxmerge.pipeline.checks import check_exact
from onnxmerge.pipeline.manager import PassManager
from onnxmerge.pipeline.state import MergeState, Task

PAIRS = {"lenet": 5, "mobilenet": 12}  # architecture -> number of layers


def prepared(a: Path, b: Path) -> MergeState:
    state = load_tasks([a, b], names=["a", "b"])
    return PassManager([*normalise_passes(), AlignLayersPass()], verify=True).run(state)


def real_pair(arch: str, second: str = "fashion") -> MergeState:
    return prepared(shipped(MODELS / f"{arch}_mnist.onnx"), shipped(MODELS / f"{arch}_{second}.onnx"))


def weights(state: MergeState, task: int = 1) -> dict[str, np.ndarray]:
    return {n: np.array(t.values) for n, t in state.tasks[task].graph.tensors().items() if hasattr(t, "values")}


def expand(p: np.ndarray, size: int) -> np.ndarray:
    block = size // len(p)
    return (p[:, None] * block + np.arange(block)).reshape(-1)


def shuffle_hidden_channels(state: MergeState, task: int = 1, seed: int = 1) -> None:
    """Permute every hidden channel of a plain chain (layers joined by per-channel glue only) at random:
    W_i' = P_i W_i P_{i-1}^T, a depthwise layer keeping its input's permutation. Function-preserving."""
    t = state.tasks[task]
    rng = np.random.default_rng(seed)
    tensors, nodes = t.graph.tensors(), {n.name: n for n in t.graph.nodes}
    p = None
    for i, layer in enumerate(t.layers):
        node, w = nodes[layer.node], tensors[layer.weight]
        out_axis = 0 if layer.op == "Conv" else int(layer.op == "MatMul" or not node.attrs.get("transB", 0))
        if p is not None and not layer.depthwise:
            in_axis = 1 if layer.op == "Conv" else 1 - out_axis
            w.values = np.take(w.values, expand(p, w.values.shape[in_axis]), axis=in_axis)
        if i == len(t.layers) - 1:
            break
        if layer.depthwise:
            q = expand(np.arange(layer.in_channels) if p is None else p, layer.out_channels)
        else:
            q = rng.permutation(layer.out_channels)
        w.values = np.take(w.values, q, axis=out_axis)
        if layer.bias:
            tensors[layer.bias].values = np.take(tensors[layer.bias].values, q, axis=-1)
        p = q


def run(state: MergeState, layers: int, **kw) -> tuple[MatchChannelsPass, bool]:
    p = MatchChannelsPass(layers, **kw)
    modified = p.call(state).modified
    return p, modified


@pytest.mark.parametrize("arch", PAIRS)
def test_function_preserved_on_real_pairs_for_every_depth(arch):
    n = PAIRS[arch]
    for k in range(1, n):  # the last layer's outputs are the task's outputs
        state = real_pair(arch)
        shuffle_hidden_channels(state)  # the shipped pairs share their initialisation: reorder B first
        check_exact(state)
        before = weights(state)
        p = MatchChannelsPass(k)
        PassManager([p], verify=True).run(state)  # --verify: check_exact after the pass
        check_exact(state)
        after = weights(state)
        assert any(not np.array_equal(before[w], after[w]) for w in before), k
        assert [r["layer"] for r in p.report["b"]] == list(range(k))
        # the reference task is never touched
        assert "b" in p.report and "a" not in p.report


@pytest.mark.parametrize("arch", PAIRS)
def test_unshuffled_real_pairs_stay_exact_and_similarity_does_not_drop(arch):
    state = real_pair(arch)
    p, _ = run(state, PAIRS[arch] - 1)
    check_exact(state)
    rows = p.report["b"]
    assert len(rows) == PAIRS[arch] - 1
    assert sum(r["after"] for r in rows) >= sum(r["before"] for r in rows) - 1e-9
    assert any("channel matching layer 0" in n for n in state.notes)


@pytest.mark.parametrize("arch", PAIRS)
@pytest.mark.parametrize("similarity", ["weights", "activations"])
def test_recovers_a_known_permutation(arch, similarity):
    state = prepared(shipped(MODELS / f"{arch}_mnist.onnx"), shipped(MODELS / f"{arch}_mnist.onnx"))
    reference = weights(state, task=0)
    shuffle_hidden_channels(state, seed=3)
    shuffled = weights(state)
    assert any(not np.array_equal(reference[w], shuffled[w]) for w in reference)
    data = np.load(shipped(MODELS / "mnist_eval.npz"))["x"][:64] if similarity == "activations" else None
    p, modified = run(state, PAIRS[arch] - 1, similarity=similarity, data=data)
    assert modified
    got = weights(state)
    for layer in state.tasks[1].layers:
        for name in filter(None, (layer.weight, layer.bias)):
            np.testing.assert_array_equal(got[name], reference[name], err_msg=name)
    assert all(r["after"] == pytest.approx(1.0) for r in p.report["b"])
    check_exact(state)


@pytest.mark.parametrize("arch", PAIRS)
def test_similarity_goes_up_on_shuffled_real_pairs(arch):
    state = real_pair(arch)
    shuffle_hidden_channels(state)
    p, _ = run(state, PAIRS[arch] - 1)
    rows = p.report["b"]
    assert sum(r["after"] for r in rows) > sum(r["before"] for r in rows) + 0.1 * len(rows)
    assert rows[0]["after"] > 0.8  # the first layer's filters of the two tasks agree once matched


def test_running_twice_changes_nothing():
    state = real_pair("mobilenet")
    shuffle_hidden_channels(state)
    run(state, 11)
    before = weights(state)
    p, modified = run(state, 11)
    assert modified is False
    assert not any(r["permuted"] for r in p.report["b"])
    after = weights(state)
    assert all(np.array_equal(before[w], after[w]) for w in before)


def test_residual_model_is_declined_and_left_unchanged():
    state = real_pair("resnet")
    before = weights(state)
    p, modified = run(state, 3)
    assert modified is False
    assert p.report == {}
    assert any("b: channel matching declined" in n and "read by 2 nodes" in n for n in state.notes)
    after = weights(state)
    assert all(np.array_equal(before[w], after[w]) for w in before)


def test_different_architectures_are_declined():
    state = prepared(shipped(MODELS / "lenet_mnist.onnx"), shipped(MODELS / "mobilenet_fashion.onnx"))
    p, modified = run(state, 2)
    assert modified is False
    assert any("b: channel matching declined: layer 0 differs" in n for n in state.notes), state.notes


def test_layers_beyond_the_last_hidden_layer_are_reduced_with_a_note():
    state = real_pair("lenet")
    p, _ = run(state, 99)
    assert len(p.report["b"]) == 4
    assert any("99 layers asked, 4 matched" in n for n in state.notes)


def test_bad_settings_are_usage_errors():
    from onnxmerge.errors import UsageError
    with pytest.raises(UsageError):
        MatchChannelsPass(-1)
    with pytest.raises(UsageError):
        MatchChannelsPass(2, similarity="gradients")
    with pytest.raises(UsageError, match="needs calibration data"):  # no data given, and no --calib
        MatchChannelsPass(2, similarity="activations").call(real_pair("lenet"))


# ---- synthetic chains: every kind of glue the pass walks through ------------------------------------


def glue_model(seed: int) -> onnx.ModelProto:
    """Conv -> BN (not folded) -> PRelu -> Pad -> Mul[1,C,1,1] -> Conv -> Relu -> MaxPool -> Reshape(0,-1)
    -> Gemm(transB=0) -> Tanh -> MatMul + Add -> Sigmoid -> Gemm(transB=1)."""
    r = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "be", "m", "v"], ["n1"], name="bn"),
        helper.make_node("PRelu", ["n1", "slope"], ["r1"], name="prelu"),
        helper.make_node("Pad", ["r1", "pads"], ["p1"], name="pad"),
        helper.make_node("Mul", ["p1", "scale"], ["s1"], name="mul"),
        helper.make_node("Conv", ["s1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("MaxPool", ["a2"], ["q2"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["q2", "shape"], ["f2"], name="flat"),
        helper.make_node("Gemm", ["f2", "w3", "b3"], ["g3"], name="fc3"),
        helper.make_node("Tanh", ["g3"], ["t3"], name="tanh"),
        helper.make_node("MatMul", ["t3", "w4"], ["mm4"], name="mm4"),
        helper.make_node("Add", ["mm4", "b4"], ["a4"], name="add4"),
        helper.make_node("Sigmoid", ["a4"], ["s4"], name="sig"),
        helper.make_node("Gemm", ["s4", "w5", "b5"], ["logits"], name="fc5", transB=1),
    ]
    inits = [
        init("w1", r.standard_normal((4, 1, 3, 3))), init("b1", r.standard_normal(4)),
        init("g", r.uniform(0.5, 1.5, 4)), init("be", r.standard_normal(4)),
        init("m", r.standard_normal(4)), init("v", r.uniform(0.5, 2, 4)),
        init("slope", r.uniform(0.05, 0.3, (4, 1, 1))),
        onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        init("scale", r.uniform(0.5, 2, (1, 4, 1, 1))),
        init("w2", r.standard_normal((6, 4, 3, 3))),
        onnx.numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
        init("w3", r.standard_normal((96, 10))), init("b3", r.standard_normal(10)),
        init("w4", r.standard_normal((10, 7))), init("b4", r.standard_normal(7)),
        init("w5", r.standard_normal((3, 7))), init("b5", r.standard_normal(3)),
    ]
    return make_model(nodes, inits, out_shape=("N", 3))


def depthwise_model(seed: int) -> onnx.ModelProto:
    """Conv -> depthwise Conv with channel multiplier 2 -> Clip -> Conv1x1 -> GlobalAveragePool -> Flatten -> Gemm."""
    r = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="dw2", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"], name="clip2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"], name="pw3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g3"], name="gap"),
        helper.make_node("Flatten", ["g3"], ["f3"], name="flat"),
        helper.make_node("Gemm", ["f3", "w4", "b4"], ["logits"], name="fc4", transB=1),
    ]
    inits = [
        init("w1", r.standard_normal((4, 1, 3, 3))), init("b1", r.standard_normal(4)),
        init("w2", r.standard_normal((8, 1, 3, 3))), init("b2", r.standard_normal(8)),
        init("lo", 0.0), init("hi", 6.0),
        init("w3", r.standard_normal((5, 8, 1, 1))), init("b3", r.standard_normal(5)),
        init("w4", r.standard_normal((3, 5))), init("b4", r.standard_normal(3)),
    ]
    return make_model(nodes, inits, out_shape=("N", 3))


def synthetic_state(models: list[onnx.ModelProto]) -> MergeState:
    """Tasks straight from ModelProtos (PRelu and Mul are beyond the loader's operator set, not the
    pass's), shape-inferred, not normalised: the BatchNormalization stays unfolded."""
    tasks = []
    for name, m in zip("ab", models):
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        tasks.append(Task(name, m, gs.import_onnx(m)))
    return PassManager([AlignLayersPass()]).run(MergeState(tasks=tasks, opset=17, ir_version=8))


@pytest.mark.parametrize("build,n_layers", [(glue_model, 5), (depthwise_model, 4)])
def test_synthetic_chains_stay_exact_at_every_depth(build, n_layers):
    for k in range(1, n_layers):
        state = synthetic_state([build(0), build(1)])
        before = weights(state)
        p = MatchChannelsPass(k)
        PassManager([p], verify=True).run(state)
        assert [r["layer"] for r in p.report["b"]] == list(range(k)), state.notes
        check_exact(state)
        after = weights(state)
        changed = {w for w in before if not np.array_equal(before[w], after[w])}
        assert changed, k
        total = p.report["b"]
        assert sum(r["after"] for r in total) >= sum(r["before"] for r in total) - 1e-9
        if build is glue_model and k == 1:
            # the first layer's permutation reaches every per-channel tensor up to conv2's input axis
            assert {"w1", "b1", "g", "be", "m", "v", "slope", "scale", "w2"} <= changed
            assert not changed & {"w3", "b3", "w4", "b4", "w5", "b5"}
        if build is depthwise_model and k == 1:
            # the unmatched depthwise layer carries the permutation on to the 1x1 conv
            assert changed == {"w1", "b1", "w2", "b2", "w3"}


def test_concat_is_declined():
    model = depthwise_model(0)
    # the depthwise output is concatenated with the input's ReLU before the 1x1 conv (8 + 1 channels)
    g = model.graph
    g.node.insert(4, helper.make_node("Relu", ["input"], ["side"], name="side"))
    g.node.insert(5, helper.make_node("Concat", ["a2", "side"], ["cat"], name="cat", axis=1))
    g.node[6].input[0] = "cat"
    g.initializer[6].CopyFrom(init("w3", np.ones((5, 9, 1, 1))))
    onnx.checker.check_model(model)
    state = synthetic_state([model, model])
    before = weights(state)
    _, modified = run(state, 1)
    assert modified is False
    assert any("b: channel matching declined" in n and "Concat cat" in n for n in state.notes), state.notes
    assert all(np.array_equal(before[w], weights(state)[w]) for w in before)
