"""The torch bridge: every real model and op configuration against onnxruntime, parameters, write-back.

Tolerance: max |module - onnxruntime| <= 1e-5 * max(1, max |onnxruntime|) (verify.EXACT_TOL), with
onnxruntime's graph optimisations off (onnxmerge.model.runtime.session).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, MODELS, shipped
from onnxmerge.api import load_tasks, merge
from onnxmerge.calibration.bridge import OPS, OnnxModule, to_module
from onnxmerge.data import load_dataset
from onnxmerge.errors import MergeError
from onnxmerge.model.runtime import session
from onnxmerge.passes.common import normalise_passes
from onnxmerge.pipeline.checks import EXACT_TOL, task_model
from onnxmerge.pipeline.manager import PassManager

REAL = [(EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "fashion_eval.npz"),
        (EXAMPLES / "digits_lenet.onnx", EXAMPLES / "digits_eval.npz")] + [
        (MODELS / f"{arch}_{data}.onnx", MODELS / f"{data}_eval.npz")
        for arch, data in [("lenet", "mnist"), ("lenet", "fashion"), ("vgg", "fashion"), ("mobilenet", "mnist"),
                           ("mobilenet", "fashion"), ("resnet", "mnist"), ("resnet", "fashion")]]
PAIR = [EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx"]


def x_of(path, n: int = 256) -> np.ndarray:
    return load_dataset(shipped(path)).x[:n]


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], module: OnnxModule | None = None) -> float:
    """Run `module` (default: a fresh one of `model`) and onnxruntime; return the worst abs diff."""
    module = module or OnnxModule(model)
    names = [o.name for o in model.graph.output]
    ref = session(model).run(names, feeds)
    with torch.no_grad():
        got = module({k: torch.from_numpy(v) for k, v in feeds.items()}, names)
    worst = 0.0
    for name, r in zip(names, ref):
        g = got[name].numpy()
        assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
        diff = float(np.abs(g.astype(np.float64) - r).max()) if r.size else 0.0
        assert diff <= EXACT_TOL * max(1.0, float(np.abs(r).max(initial=0))), (name, diff)
        worst = max(worst, diff)
    return worst


# ----------------------------------------------------------------------------------------------
# real models, real data


@pytest.mark.parametrize("path,data", REAL, ids=[p.stem for p, _ in REAL])
def test_real_model_matches_onnxruntime(path, data):
    model = onnx.load(str(shipped(path)))
    assert_matches_ort(model, {"input": x_of(data)})


@pytest.mark.parametrize("path,data", REAL[:2] + REAL[5:6] + REAL[7:8], ids=lambda v: getattr(v, "stem", ""))
def test_normalised_model_matches_onnxruntime(path, data):
    """After constant folding and BatchNorm folding, as merge normalises every input."""
    state = load_tasks([shipped(path)])
    PassManager(normalise_passes()).run(state)
    model = task_model(state.tasks[0], state)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    assert_matches_ort(model, {"input": x_of(data)})


@pytest.fixture(scope="module")
def packed() -> onnx.ModelProto:
    return merge([shipped(p) for p in PAIR], method="pack", names=["fashion", "digits"]).model


def test_packed_pair_matches_onnxruntime(packed):
    feeds = {"fashion/input": x_of(EXAMPLES / "fashion_eval.npz"), "digits/input": x_of(EXAMPLES / "digits_eval.npz")}
    module = OnnxModule(packed)
    assert module.input_names == ["fashion/input", "digits/input"]
    assert module.output_names == ["fashion/logits", "digits/logits"]
    assert_matches_ort(packed, feeds, module)


# ----------------------------------------------------------------------------------------------
# synthetic graphs for what the real models do not exercise


def f32(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def i64(values) -> np.ndarray:
    return np.asarray(values, np.int64)


def finish(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    """A checked model of `graph`; shape inference fills in the outputs' shapes, which the checker wants."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # onnxruntime 1.31 rejects onnx 1.23's default IR version
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def one_op(op: str, x_shape, inits: dict[str, np.ndarray] | None = None, extra_inputs=(), opset: int = 17,
           **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> op(x, *extra_inputs) -> y, extra inputs being initializers ('' for an omitted optional)."""
    inits = inits or {}
    node = helper.make_node(op, ["x", *extra_inputs], ["y"], name=f"{op.lower()}_node", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return finish(graph, opset), {"x": f32(*x_shape, seed=1)}


W33, B6 = f32(6, 2, 3, 3), f32(6)
CASES = {
    "conv_asym_pads_group_dilation": ("Conv", (2, 4, 9, 10), {"w": W33, "b": B6}, ["w", "b"],
                                      dict(pads=[0, 1, 2, 1], strides=[2, 1], dilations=[1, 2], group=2)),
    "conv_1d_no_bias": ("Conv", (2, 3, 11), {"w": f32(4, 3, 3)}, ["w"], dict(pads=[2, 1], strides=[2])),
    "conv_depthwise": ("Conv", (1, 4, 7, 7), {"w": f32(4, 1, 3, 3)}, ["w"], dict(group=4, pads=[1, 1, 1, 1])),
    "conv_same_upper": ("Conv", (1, 4, 7, 8), {"w": f32(3, 4, 4, 3)}, ["w"], dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv_same_lower": ("Conv", (1, 4, 7, 8), {"w": f32(3, 4, 4, 3)}, ["w"], dict(auto_pad="SAME_LOWER", strides=[2, 3])),
    "conv_valid": ("Conv", (1, 4, 7, 8), {"w": f32(3, 4, 3, 3)}, ["w"], dict(auto_pad="VALID", strides=[2, 2])),
    "maxpool_ceil": ("MaxPool", (1, 2, 8, 9), {}, [], dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    "maxpool_asym_pads_ceil": ("MaxPool", (1, 2, 8, 9), {}, [], dict(kernel_shape=[3, 2], strides=[2, 2],
                                                                      pads=[1, 0, 0, 1], ceil_mode=1)),
    # ceil would add a last window that starts in the end padding: onnxruntime drops it
    "maxpool_ceil_last_window_in_pad": ("MaxPool", (1, 2, 8, 8), {}, [], dict(kernel_shape=[2, 2], strides=[2, 2],
                                                                               pads=[0, 0, 1, 1], ceil_mode=1)),
    "avgpool_ceil_last_window_in_pad": ("AveragePool", (1, 2, 8, 8), {}, [], dict(kernel_shape=[2, 2], strides=[2, 2],
                                                                                   pads=[0, 0, 1, 1], ceil_mode=1,
                                                                                   count_include_pad=1)),
    "maxpool_dilated_1d": ("MaxPool", (2, 3, 12), {}, [], dict(kernel_shape=[3], strides=[2], dilations=[2], pads=[2, 2])),
    "maxpool_same_upper": ("MaxPool", (1, 2, 7, 6), {}, [], dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")),
    "avgpool_include_pad_ceil": ("AveragePool", (1, 2, 8, 9), {}, [], dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                           pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1)),
    "avgpool_exclude_pad_ceil": ("AveragePool", (1, 2, 8, 9), {}, [], dict(kernel_shape=[3, 3], strides=[2, 2],
                                                                           pads=[1, 0, 1, 2], ceil_mode=1)),
    "avgpool_include_pad_asym": ("AveragePool", (1, 2, 7, 7), {}, [], dict(kernel_shape=[2, 3], pads=[0, 2, 1, 0],
                                                                           count_include_pad=1)),
    "avgpool_plain": ("AveragePool", (1, 2, 8, 8), {}, [], dict(kernel_shape=[2, 2], strides=[2, 2])),
    "global_avgpool_1d": ("GlobalAveragePool", (2, 3, 10), {}, [], {}),
    "pad_reflect": ("Pad", (1, 2, 5, 6), {"p": i64([0, 0, 1, 2, 0, 0, 2, 1])}, ["p"], dict(mode="reflect")),
    "pad_edge": ("Pad", (1, 2, 5, 6), {"p": i64([0, 1, 2, 0, 0, 0, 1, 3])}, ["p"], dict(mode="edge")),
    "pad_constant_value_crop": ("Pad", (1, 2, 5, 6), {"p": i64([0, 0, 2, -1, 0, 0, -2, 1]),
                                                      "v": np.array(1.5, np.float32)}, ["p", "v"], {}),
    "pad_wrap_axes": ("Pad", (1, 2, 5, 6), {"p": i64([2, 1, 1, 3]), "a": i64([-1, 2])}, ["p", "", "a"],
                      dict(mode="wrap", opset=19)),
    "reshape_zero_minus_one": ("Reshape", (2, 3, 4, 5), {"s": i64([0, -1, 5])}, ["s"], {}),
    "reshape_zero_middle": ("Reshape", (2, 3, 4, 5), {"s": i64([0, 0, 2, -1])}, ["s"], {}),
    "gemm_alpha_beta_transA": ("Gemm", (4, 3), {"b": f32(4, 5), "c": f32(5)}, ["b", "c"],
                               dict(alpha=0.5, beta=2.0, transA=1)),
    "gemm_transB_no_c": ("Gemm", (3, 4), {"b": f32(5, 4)}, ["b"], dict(transB=1, alpha=1.5)),
    "gemm_c_matrix": ("Gemm", (3, 4), {"b": f32(4, 2), "c": f32(3, 2)}, ["b", "c"], dict(beta=0.25)),
    "matmul_batched": ("MatMul", (2, 3, 4), {"b": f32(4, 5)}, ["b"], {}),
    "softmax_axis1": ("Softmax", (2, 3, 4), {}, [], dict(axis=1)),
    "softmax_default": ("Softmax", (2, 3, 4), {}, [], {}),
    "concat_axis1": ("Concat", (2, 3, 4), {"c": f32(2, 2, 4)}, ["c", "x"], dict(axis=1)),
    "transpose": ("Transpose", (2, 3, 4, 5), {}, [], dict(perm=[0, 2, 3, 1])),
    "transpose_default": ("Transpose", (2, 3, 4), {}, [], {}),
    "leaky_relu": ("LeakyRelu", (2, 7), {}, [], dict(alpha=0.2)),
    "sigmoid": ("Sigmoid", (2, 7), {}, [], {}),
    "tanh": ("Tanh", (2, 7), {}, [], {}),
    "clip_both": ("Clip", (2, 7), {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}, ["lo", "hi"], {}),
    "clip_max_only": ("Clip", (2, 7), {"hi": np.array(0.3, np.float32)}, ["", "hi"], {}),
    "clip_no_bounds": ("Clip", (2, 7), {}, [], {}),
    "sub": ("Sub", (2, 3, 4), {"c": f32(4)}, ["c"], {}),
    "div": ("Div", (2, 3, 4), {"c": f32(3, 1) + 3}, ["c"], {}),
    "mul": ("Mul", (2, 3, 4), {"c": f32(1, 3, 1)}, ["c"], {}),
    "batchnorm_1d_eps": ("BatchNormalization", (2, 3, 5),
                         {"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.1}, ["s", "b", "m", "v"],
                         dict(epsilon=1e-2)),
    "flatten_axis2": ("Flatten", (2, 3, 4, 5), {}, [], dict(axis=2)),
    "flatten_axis0": ("Flatten", (2, 3, 4), {}, [], dict(axis=0)),
    "flatten_axis_negative": ("Flatten", (2, 3, 4, 5), {}, [], dict(axis=-1)),
    "gather_axis1_negative": ("Gather", (3, 6, 2), {"i": i64([[0, -1], [2, 2], [5, -6]])}, ["i"], dict(axis=1)),
    "unsqueeze": ("Unsqueeze", (2, 3), {"a": i64([0, -1])}, ["a"], {}),
    "squeeze": ("Squeeze", (2, 1, 3, 1), {"a": i64([1])}, ["a"], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_onnxruntime(case):
    op, shape, inits, extra, attrs = CASES[case]
    attrs = dict(attrs)
    model, feeds = one_op(op, shape, inits, extra, opset=attrs.pop("opset", 17), **attrs)
    assert_matches_ort(model, feeds)


def test_small_graph_of_remaining_ops_matches_onnxruntime():
    """Gather of a codebook by an integer buffer, Dropout, Identity, Constant, Shape in one graph."""
    codebook, codes = f32(8, 4), i64(np.random.default_rng(0).integers(0, 8, (3, 5)))
    nodes = [
        helper.make_node("Gather", ["codebook", "codes"], ["w"], name="lookup"),  # (3, 5, 4)
        helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.float32([0.5, 2, -1, 1]))),
        helper.make_node("Mul", ["w", "k"], ["wk"], name="scale"),
        helper.make_node("Dropout", ["x"], ["xd"], name="drop"),
        helper.make_node("Identity", ["xd"], ["xi"], name="ident"),
        helper.make_node("Add", ["wk", "xi"], ["y"], name="add"),
        helper.make_node("Shape", ["y"], ["shape"], name="shape", start=1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("shape", TensorProto.INT64, None)],
                              initializer=[numpy_helper.from_array(codebook, "codebook"),
                                           numpy_helper.from_array(codes, "codes")])
    model = finish(graph)
    assert_matches_ort(model, {"x": f32(3, 5, 4)})
    module = OnnxModule(model)
    assert "codes" not in dict(module.named_parameters()) and module.trainable_initializers() == ["codebook", "k"]
    # the codewords train with fixed assignments: each gets the sum of its uses' gradients
    module({"x": torch.zeros(3, 5, 4)}, ["y"])["y"].sum().backward()
    expected = torch.zeros(8, 4).index_add_(0, torch.from_numpy(codes).reshape(-1), torch.tensor([0.5, 2, -1, 1]).expand(15, 4))
    torch.testing.assert_close(module.parameter("codebook").grad, expected)


# ----------------------------------------------------------------------------------------------
# parameters: sharing, freezing, buffers


def shared_weight_model() -> onnx.ModelProto:
    """Two Convs read w (one padded, one strided), two Gemms read g: sharing on purpose."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b1"], ["c1"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["c2"], name="conv_b", pads=[1, 1, 1, 1], strides=[1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu_b"),
        helper.make_node("Add", ["c1", "r2"], ["s"], name="add"),
        helper.make_node("Flatten", ["s"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g"], ["y1"], name="fc_a", transB=1),
        helper.make_node("Gemm", ["f", "g", "gb"], ["y2"], name="fc_b", transB=1),
        helper.make_node("Reshape", ["y2", "shape"], ["y"], name="reshape"),
    ]
    inits = {"w": f32(2, 1, 3, 3), "b1": f32(2), "g": f32(3, 2 * 5 * 5), "gb": f32(3), "shape": i64([0, -1])}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 5, 5])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("y1", "y")],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return finish(graph)


def test_shared_weight_is_one_parameter_with_summed_gradient():
    model = shared_weight_model()
    module = OnnxModule(model)
    assert len(list(module.parameters())) == 4 and module.trainable_initializers() == ["w", "b1", "g", "gb"]
    x = torch.from_numpy(f32(2, 1, 5, 5))
    out = module({"x": x})
    (out["y1"].square().sum() + out["y"].sum()).backward()

    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).requires_grad_() for t in model.graph.initializer
            if t.data_type == TensorProto.FLOAT}
    s = F.conv2d(x, init["w"], init["b1"], padding=1) + torch.relu(F.conv2d(x, init["w"], padding=1))
    f = s.reshape(2, -1)
    ((f @ init["g"].t()).square().sum() + (f @ init["g"].t() + init["gb"]).sum()).backward()
    for name, ref in init.items():
        torch.testing.assert_close(module.parameter(name).grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_frozen_and_integer_initializers():
    module = OnnxModule(shared_weight_model(), frozen=["b1"], trainable=lambda n: n != "gb")
    assert module.trainable_initializers() == ["w", "g"]
    assert not module.parameter("b1").requires_grad and not module.parameter("gb").requires_grad
    buffers = dict(module.named_buffers())
    assert list(buffers) == [module.attribute_of["shape"]] and buffers[module.attribute_of["shape"]].dtype == torch.int64
    assert module.attribute_of["shape"] not in dict(module.named_parameters())
    with pytest.raises(MergeError, match="'nope'"):
        OnnxModule(shared_weight_model(), frozen=["nope"])
    with pytest.raises(MergeError, match="not a float initializer"):
        module.parameter("shape")


def test_parameter_names_are_valid_torch_names_and_to_moves_everything(packed):
    module = OnnxModule(packed)
    for name, p in module.named_parameters():
        assert "." not in name and "/" not in name
        assert module.parameter(module.initializer_of[name]) is p
    assert len(module.state_dict()) == len(packed.graph.initializer)
    module.to("meta")
    assert all(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])


# ----------------------------------------------------------------------------------------------
# forward: intermediate outputs, only the needed nodes, errors


def test_forward_runs_only_what_the_requested_tensors_need(packed, monkeypatch):
    calls = []
    relu = OPS["Relu"]
    monkeypatch.setitem(OPS, "Relu", lambda node, inputs, attrs: calls.append(node.name) or relu(node, inputs, attrs))
    module = OnnxModule(packed)
    layer = next(n.output[0] for n in packed.graph.node if n.name == "fashion//features/features.2/Relu")
    x = torch.from_numpy(x_of(EXAMPLES / "fashion_eval.npz", 8))
    out = module({"fashion/input": x}, [layer])  # the digits input may be absent
    assert list(out) == [layer] and out[layer].shape == (8, 8, 28, 28)
    assert calls == ["fashion//features/features.2/Relu"]
    full = module({"fashion/input": x}, ["fashion/logits", layer])
    torch.testing.assert_close(full[layer], out[layer])
    assert len(module._plans) == 2
    with pytest.raises(MergeError, match="missing feed 'digits/input'"):
        module({"fashion/input": x})
    with pytest.raises(MergeError, match="no tensor named 'nope'"):
        module({"fashion/input": x}, ["nope"])
    with pytest.raises(MergeError, match="not inputs of this model"):
        module({"input": x}, [layer])


def test_unsupported_op_is_one_line_error_naming_the_node():
    model, _ = one_op("Erf", (2, 3))
    with pytest.raises(MergeError) as err:
        OnnxModule(model)
    assert str(err.value) == "the torch bridge does not support Erf (node 'erf_node')"


# ----------------------------------------------------------------------------------------------
# write-back


@pytest.mark.parametrize("path", [PAIR[0], MODELS / "mobilenet_mnist.onnx"], ids=lambda p: p.stem)
def test_write_back_round_trip(path):
    """mobilenet keeps Constant nodes (Clip bounds): their values are written back too."""
    model = onnx.load(str(shipped(path)))
    module = to_module(model)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)
    written = module.write_back(model)
    onnx.checker.check_model(written)
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in written.graph.node] == \
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert [(t.name, t.data_type, list(t.dims)) for t in written.graph.initializer] == \
        [(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer]
    assert written.graph.input == model.graph.input and written.graph.output == model.graph.output
    x = x_of(MODELS / "mnist_eval.npz", 64)
    assert_matches_ort(written, {"input": x}, module)
    w0 = model.graph.initializer[0]
    np.testing.assert_array_equal(numpy_helper.to_array(written.graph.initializer[0]),
                                  numpy_helper.to_array(w0) + np.float32(0.1))
    assert model.graph.initializer[0] == w0  # the input model is untouched
