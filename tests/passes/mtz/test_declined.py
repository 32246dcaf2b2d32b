"""mtz on graphs with nodes it cannot zip: the node is declined with a reason in the report and runs
per task with everything after it (each task's own node and constants, reading its own channels of
the zipped tensors in its channel order); the layers before it are still zipped.

Small synthetic graphs of two same-architecture models (different seeds): Inception-like Concat,
squeeze-excitation Mul, channel shuffle (Reshape-Transpose-Reshape), LRN after the first conv, a
grouped convolution, a depthwise one with a depth multiplier, and a graph with nothing to zip.
(Depthwise layers of multiplier 1 are zipped: test_mtz_depthwise.)"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_mtz import NAMES, outputs

from onnxmerge.api import load_tasks, merge
from onnxmerge.data import Dataset
from onnxmerge.errors import UsageError
from onnxmerge.measure.metrics import model_stats
from onnxmerge.model.runtime import session
from onnxmerge.passes.common import normalise_passes
from onnxmerge.passes.common.align_layers import AlignLayersPass
from onnxmerge.passes.common.combine_graphs import CombineGraphsPass
from onnxmerge.passes.mtz.zip_neurons import ZipNeuronsPass
from onnxmerge.pipeline.manager import PassManager


def rel_diff(got, ref):
    return float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))


def check_exact(result, files, x, input_name="input"):
    got = outputs(result.model, result.info, x)
    for name, path in zip(NAMES, files):
        ref = session(onnx.load(str(path))).run(None, {input_name: x})[0]
        assert rel_diff(got[name], ref) <= 1e-5, name


# ---------------------------------------------------------------------------------------------- MobileNet


# ---------------------------------------------------------------------------------------------- synthetic graphs

C = 8  # channels of the synthetic models' hidden layers
CLASSES = 5


class _Graph:
    """A small NCHW graph (input 3x8x8) built node by node with seeded weights."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def const(self, name, value, dtype=np.float32):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def conv(self, name, x, cin, cout, k=3, group=1):
        w = self.rng.standard_normal((cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        inputs = [x, self.const(f"{name}.w", w), self.const(f"{name}.b", 0.1 * self.rng.standard_normal(cout))]
        self.node("Conv", inputs, name, pads=[k // 2] * 4, group=group)
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def head(self, x, cin):
        g = self.node("GlobalAveragePool", [x], "gap")
        f = self.node("Flatten", [g], "flat")
        w = self.const("fc.w", self.rng.standard_normal((CLASSES, cin)) / np.sqrt(cin))
        self.nodes.append(helper.make_node("Gemm", [f, w, self.const("fc.b", self.rng.standard_normal(CLASSES))],
                                           ["logits"], name="fc", transB=1))

    def model(self):
        graph = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def inception(g):
    x = g.node("Relu", [g.conv("conv0", "input", 3, C)], "relu0")
    a = g.node("Relu", [g.conv("branch_a", x, C, C // 2, k=1)], "relu_a")
    b = g.node("Relu", [g.conv("branch_b", x, C, C // 2)], "relu_b")
    cat = g.node("Concat", [a, b], "concat", axis=1)
    g.head(g.node("Relu", [g.conv("conv2", cat, C, C)], "relu2"), C)
    return "concat"


def squeeze_excitation(g):
    x = g.node("Relu", [g.conv("conv0", "input", 3, C)], "relu0")
    x = g.node("Relu", [g.conv("conv1", x, C, C)], "relu1")
    s = g.node("GlobalAveragePool", [x], "se_pool")
    s = g.node("Relu", [g.conv("se_reduce", s, C, C // 2, k=1)], "se_relu")
    s = g.node("Sigmoid", [g.conv("se_expand", s, C // 2, C, k=1)], "se_gate")
    y = g.node("Mul", [x, s], "se_mul")
    g.head(g.node("Relu", [g.conv("conv2", y, C, C)], "relu2"), C)
    return "se_mul"


def channel_shuffle(g):
    x = g.node("Relu", [g.conv("conv0", "input", 3, C)], "relu0")
    x = g.node("Relu", [g.conv("conv1", x, C, C)], "relu1")
    r = g.node("Reshape", [x, g.const("shape5", [0, 2, C // 2, 8, 8], np.int64)], "shuffle_split")
    t = g.node("Transpose", [r], "shuffle_swap", perm=[0, 2, 1, 3, 4])
    y = g.node("Reshape", [t, g.const("shape4", [0, C, 8, 8], np.int64)], "shuffle_join")
    g.head(g.node("Relu", [g.conv("conv2", y, C, C)], "relu2"), C)
    return "shuffle_split"


def lrn_after_first_conv(g):
    x = g.node("LRN", [g.conv("conv0", "input", 3, C)], "lrn", size=3, alpha=1e-2, beta=0.75, bias=1.0)
    x = g.node("Relu", [x], "relu0")
    g.head(g.node("Relu", [g.conv("conv1", x, C, C)], "relu1"), C)
    return "lrn"


def grouped(g):
    x = g.node("Relu", [g.conv("conv0", "input", 3, C)], "relu0")
    x = g.node("Relu", [g.conv("grouped", x, C, C, group=2)], "relu1")
    g.head(g.node("Relu", [g.conv("conv2", x, C, C)], "relu2"), C)
    return "grouped"


def depth_multiplier(g):
    x = g.node("Relu", [g.conv("conv0", "input", 3, C)], "relu0")
    x = g.node("Relu", [g.conv("dw_x2", x, C, 2 * C, group=C)], "relu1")
    g.head(g.node("Relu", [g.conv("conv2", x, 2 * C, C)], "relu2"), C)
    return "dw_x2"


GRAPHS = {"inception": inception, "squeeze_excitation": squeeze_excitation, "channel_shuffle": channel_shuffle,
          "lrn": lrn_after_first_conv, "grouped": grouped, "depth_multiplier": depth_multiplier}
# the layers before the declined node (zipped), and the layers after it (declined)
ZIPPED = {"inception": ["conv0", "branch_a", "branch_b"], "squeeze_excitation": ["conv0", "conv1", "se_reduce", "se_expand"],
          "channel_shuffle": ["conv0", "conv1"], "lrn": ["conv0"], "grouped": ["conv0"], "depth_multiplier": ["conv0"]}
AFTER = {"inception": ["conv2", "fc"], "squeeze_excitation": ["conv2", "fc"], "channel_shuffle": ["conv2", "fc"],
         "lrn": ["conv1", "fc"], "grouped": ["conv2", "fc"], "depth_multiplier": ["conv2", "fc"]}
REASON = {"grouped": "grouped convolution (groups=2)", "depth_multiplier": "depth multiplier 2"}


def write_pair(tmp_path, build):
    files = []
    for seed in range(2):
        g = _Graph(seed)
        declined = build(g)
        files.append(tmp_path / f"m{seed}.onnx")
        onnx.save(g.model(), str(files[-1]))
    return files, declined


def random_calib(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return {name: Dataset(rng.standard_normal((n, 3, 8, 8)).astype(np.float32), None, "random", {}) for name in NAMES}


def run_merge(files, ratio, **params):
    return merge([str(f) for f in files], method="mtz", names=NAMES, calib=random_calib(),
                 params={"share_ratio": ratio, "hessian_samples": 64, **params})


@pytest.mark.parametrize("arch", list(GRAPHS))
def test_synthetic_graph_is_zipped_before_its_declined_node(tmp_path, arch):
    files, declined = write_pair(tmp_path, GRAPHS[arch])
    x = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    exact = run_merge(files, 0.0)
    check_exact(exact, files, x)
    full = run_merge(files, 1.0)
    for result in (exact, full):
        rows = result.state.figures["mtz_declined"]
        assert rows[0] == {"node": declined, "op": rows[0]["op"], "reason": rows[0]["reason"]}
        assert [r["node"] for r in rows[1:]] == AFTER[arch]
        assert all(r["reason"] == f"after declined node {declined}" for r in rows[1:])
        (note,) = [n for n in result.state.notes if n.startswith("mtz:")]
        assert f"mtz: {declined} ({rows[0]['op']}) declined: " in note
        assert REASON.get(arch, "") in rows[0]["reason"]
    assert [r["node"] for r in full.state.figures["mtz"]["layers"]] == ZIPPED[arch]
    assert all(r["shared"] > 0 for r in full.state.figures["mtz"]["layers"])
    got = outputs(full.model, full.info, x)
    assert all(np.isfinite(v).all() for v in got.values())
    pack = merge([str(f) for f in files], method="pack", names=NAMES).model
    assert model_stats(full.model)["params"] < model_stats(pack)["params"]


def _zip(files, ratio):
    """The merge pipeline by hand, to look at the ZippedNet."""
    state = load_tasks([str(f) for f in files], NAMES)
    state.calib = random_calib()
    mtz = ZipNeuronsPass(hessian_samples=64, share_ratio=ratio)
    state = PassManager([*normalise_passes(), AlignLayersPass(None), CombineGraphsPass(), mtz]).run(state)
    return state, mtz.net


@pytest.mark.parametrize("arch,cuts", [("lrn", ["conv0"]), ("squeeze_excitation", ["relu1", "se_gate"]),
                                       ("inception", ["relu_a", "relu_b"])])
def test_declined_region_is_each_original_on_its_own_channels(tmp_path, arch, cuts):
    """Cut each original at the zipped tensors that its declined node reads and feed it the task's
    channels of the merged model's tensors there (in the task's channel order): its own nodes after
    the cut must give the merged model's output. A declined region zipped by mistake (merged weights
    after the cut) or a task reading the columns in merged order fails this."""
    files, _ = write_pair(tmp_path, GRAPHS[arch])
    state, net = _zip(files, 1.0)
    model = net.build()
    model.graph.output.extend(helper.make_tensor_value_info(f"mtz/{c}", TensorProto.FLOAT, None) for c in cuts)
    x = np.random.default_rng(4).standard_normal((8, 3, 8, 8)).astype(np.float32)
    sess = session(model)
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
    for t, (task, path) in enumerate(zip(state.tasks, files)):
        graph = gs.import_onnx(onnx.load(str(path)))
        tensors = graph.tensors()
        feeds = {}
        for name in cuts:
            columns = net.spaces[net.tensor_space[name][0]].columns
            assert any(len(c) == 2 for c in columns)  # shared neurons in the zipped tensor
            cols = [k for _, k in sorted((c[t], k) for k, c in enumerate(columns) if t in c)]
            feeds[name] = values[f"mtz/{name}"][:, cols]
            tensors[name].dtype, tensors[name].shape = np.float32, list(feeds[name].shape)
        graph.inputs = [tensors[name] for name in cuts]
        graph.cleanup(remove_unused_graph_inputs=True)
        ref = session(gs.export_onnx(graph)).run(None, feeds)[0]
        (out,) = task.output_map.values()
        np.testing.assert_allclose(values[out], ref, rtol=1e-5, atol=1e-5)


def test_resuming_a_model_with_declined_nodes_is_refused(tmp_path):
    files, _ = write_pair(tmp_path, lrn_after_first_conv)
    ab = tmp_path / "ab.onnx"
    merge([str(f) for f in files], ab, method="mtz", names=NAMES, calib=random_calib(),
          params={"share_ratio": 0.5, "hessian_samples": 64})
    third = _Graph(2)
    lrn_after_first_conv(third)
    onnx.save(third.model(), str(tmp_path / "m2.onnx"))
    out = tmp_path / "abc.onnx"
    with pytest.raises(UsageError) as e:
        merge([str(ab), str(tmp_path / "m2.onnx")], out, method="mtz", names=["third"],
              calib={**random_calib(), "third": random_calib()["mnist"]}, params={"share_ratio": 0.5, "hessian_samples": 64})
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "declined" in message and "original models" in message
    assert str(ab) in message and not out.exists()


def test_nothing_to_zip_is_pack_with_a_note(tmp_path):
    """LRN on the model input: every layer after it is declined; the merge is the two models side
    by side (exact at any share ratio) and needs no calibration data."""
    def lrn_first(g):
        x = g.node("LRN", ["input"], "lrn_in", size=3)
        g.head(g.node("Relu", [g.conv("conv0", x, 3, C)], "relu0"), C)
        return "lrn_in"

    files, declined = write_pair(tmp_path, lrn_first)
    result = merge([str(f) for f in files], method="mtz", names=NAMES, params={"share_ratio": 1.0})
    check_exact(result, files, np.random.default_rng(5).standard_normal((4, 3, 8, 8)).astype(np.float32))
    assert any("nothing to zip" in n for n in result.state.notes)
    assert [d["node"] for d in result.state.figures["mtz_declined"]] == [declined, "conv0", "fc"]
    pack = merge([str(f) for f in files], method="pack", names=NAMES).model
    assert model_stats(result.model)["params"] == model_stats(pack)["params"]


def test_retraining_trains_and_keeps_the_declined_layers(tmp_path):
    """Retraining trains every weight of the built model; the declined layers' new weights are kept
    for the next build (not reset to the originals)."""
    files, _ = write_pair(tmp_path, lrn_after_first_conv)
    data = random_calib()
    for task, path in zip(NAMES, files):  # labels: the original's own predictions
        data[task].y = session(onnx.load(str(path))).run(None, {"input": data[task].x})[0].argmax(axis=1)
    result = merge([str(f) for f in files], method="mtz", names=NAMES, calib=data,
                   params={"share_ratio": 1.0, "hessian_samples": 64, "retrain_steps": 3})
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    for task, path in zip(NAMES, files):
        original = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        own = inits[f"{task}/conv1/conv1.w"]
        assert own.shape == original["conv1.w"].shape and not np.allclose(own, original["conv1.w"])


def test_silu_and_scalar_ops_are_zipped_and_differing_constants_declined(tmp_path):
    """x * sigmoid(x) (both factors of one space) and ops with a scalar constant act on each channel
    alone: zipped, nothing declined. A Clip whose bounds differ between the tasks is declined (one
    node computed once could not use both tasks' bounds)."""
    def silu(g):
        x = g.conv("conv0", "input", 3, C)
        x = g.node("Mul", [x, g.node("Sigmoid", [x], "sig0")], "silu0")
        x = g.node("Mul", [x, g.const("half", 0.5)], "scale0")
        x = g.conv("conv1", x, C, C)
        x = g.node("Clip", [x, g.const("lo", 0.0), g.const("hi", 6.0 if g.seed == 0 else 5.0)], "clip1")
        g.head(g.node("Relu", [g.conv("conv2", x, C, C)], "relu2"), C)

    files = []
    for seed in range(2):
        g = _Graph(seed)
        g.seed = seed
        silu(g)
        files.append(tmp_path / f"m{seed}.onnx")
        onnx.save(g.model(), str(files[-1]))
    x = np.random.default_rng(6).standard_normal((8, 3, 8, 8)).astype(np.float32)
    check_exact(run_merge(files, 0.0), files, x)
    full = run_merge(files, 1.0)
    rows = full.state.figures["mtz_declined"]
    assert rows[0]["node"] == "clip1" and "differ between the tasks" in rows[0]["reason"]
    assert [r["node"] for r in rows[1:]] == ["conv2", "fc"]
    assert [(r["node"], r["shared"]) for r in full.state.figures["mtz"]["layers"]] == [("conv0", C), ("conv1", C)]


def test_matmul_layers_with_bias_and_residual_adds(tmp_path):
    """MatMul layers: a bias Add is part of its layer, a residual Add after a MatMul is not (it joins
    the spaces): sharing nothing is exact, sharing everything runs."""
    files = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        w = {n: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 12)), ("b1", (12,)), ("w2", (12, 12)), ("w3", (12, CLASSES)), ("b3", (CLASSES,)))}
        nodes = [helper.make_node("MatMul", ["input", "w1"], ["m1"], name="fc1"),
                 helper.make_node("Add", ["m1", "b1"], ["a1"], name="bias1"),
                 helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
                 helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="fc2"),
                 helper.make_node("Add", ["m2", "h1"], ["res"], name="residual"),
                 helper.make_node("MatMul", ["res", "w3"], ["m3"], name="fc3"),
                 helper.make_node("Add", ["m3", "b3"], ["logits"], name="bias3")]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
                                  list(w.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        files.append(tmp_path / f"mlp{seed}.onnx")
        onnx.save(model, str(files[-1]))
    rng = np.random.default_rng(0)
    data = {n: Dataset(rng.standard_normal((64, 16)).astype(np.float32), None, "random", {}) for n in NAMES}
    x = rng.standard_normal((8, 16)).astype(np.float32)
    for ratio in (0.0, 1.0):
        result = merge([str(f) for f in files], method="mtz", names=NAMES, calib=data,
                       params={"share_ratio": ratio, "hessian_samples": 64})
        assert "mtz_declined" not in result.state.figures
        if ratio == 0:
            check_exact(result, files, x)
        else:
            assert all(np.isfinite(v).all() for v in outputs(result.model, result.info, x).values())
