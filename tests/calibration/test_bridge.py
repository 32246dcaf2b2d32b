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
        if r.dtype.kind not in "fc":  # integers and booleans (ArgMax, comparisons, shapes): exactly
            np.testing.assert_array_equal(g, r, err_msg=name)
            continue
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


def finish(graph: onnx.GraphProto, opset: int = 17, check: bool = True) -> onnx.ModelProto:
    """A checked model of `graph`; shape inference fills in the outputs' shapes, which the checker wants."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # onnxruntime 1.31 rejects onnx 1.23's default IR version; opsets from 18 on need a newer one
    model.ir_version = max(8, helper.find_min_ir_version_for(list(model.opset_import)))
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    if check:
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


@pytest.mark.parametrize("case", ["clip_both", "clip_max_only"])
@pytest.mark.parametrize("bounds_trained", [False, True])
def test_clip_values_and_gradients(case, bounds_trained):
    """Fixed bounds (as calibration holds ReLU6's) run as numbers, trained ones as tensors: the same
    values as onnxruntime either way, and the gradient of numpy's clip (1 strictly inside the bounds,
    0 outside); trained bounds get the gradient of the entries they clip."""
    op, shape, inits, extra, attrs = CASES[case]
    model, feeds = one_op(op, shape, inits, extra, **attrs)
    module = OnnxModule(model, trainable=lambda name: bounds_trained)
    assert_matches_ort(model, feeds, module)
    x = torch.from_numpy(feeds["x"]).requires_grad_()
    weights = f32(*shape, seed=2)
    (module({"x": x})["y"] * torch.from_numpy(weights)).sum().backward()
    lo, hi = inits.get("lo", -np.inf), inits.get("hi", np.inf)
    inside = (feeds["x"] > lo) & (feeds["x"] < hi)
    np.testing.assert_array_equal(x.grad.numpy(), np.where(inside, weights, 0))
    for name, bound in (("lo", feeds["x"] < lo), ("hi", feeds["x"] > hi)):
        if name in inits:
            grad = module.parameter(name).grad
            assert (grad is None) if not bounds_trained else np.isclose(grad.item(), weights[bound].sum())


def test_convolutions_run_channels_last_with_the_same_values():
    """2-D convolutions switch a CPU tensor to channels-last (faster in oneDNN): the values of a conv
    -> relu -> conv chain match onnxruntime, and its input's gradient that of the same chain in
    PyTorch on contiguous tensors."""
    w1, w2 = f32(8, 3, 3, 3, seed=3), f32(4, 4, 3, 3, seed=4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", group=2, strides=[2, 2])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model, x = finish(graph), f32(2, 3, 9, 9, seed=1)
    module = OnnxModule(model)
    assert_matches_ort(model, {"x": x}, module)
    got = torch.from_numpy(x).requires_grad_()
    out = module({"x": got}, ["h", "y"])
    assert out["h"].is_contiguous(memory_format=torch.channels_last)
    out["y"].sum().backward()
    ref = torch.from_numpy(x).requires_grad_()
    F.conv2d(F.relu(F.conv2d(ref, torch.from_numpy(w1), padding=1)), torch.from_numpy(w2),
             stride=2, groups=2).sum().backward()
    np.testing.assert_allclose(got.grad.numpy(), ref.grad.numpy(), rtol=1e-5, atol=1e-5)


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
# the operators of other CNN graphs (torchvision-style, model-zoo): one node each, several input types


def node_model(op: str, feeds: dict[str, np.ndarray], inits: dict[str, np.ndarray] | None = None,
               inputs: list[str] | None = None, outputs: int = 1, opset: int = 17, out_type: int | None = None,
               check: bool = True, **attrs) -> onnx.ModelProto:
    """op(inputs) -> y (y0, y1, ... for several outputs), inputs being feeds then initializers unless
    given ('' for an omitted optional one); shape inference types the outputs, unless out_type does
    (an op it does not infer: outputs of the first feed's shape)."""
    inits = inits or {}
    names = [*feeds, *inits] if inputs is None else inputs
    outs = ["y"] if outputs == 1 else [f"y{k}" for k in range(outputs)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", **attrs)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
         for k, v in feeds.items()],
        [helper.make_empty_tensor_value_info(o) if out_type is None else
         helper.make_tensor_value_info(o, out_type, list(next(iter(feeds.values())).shape)) for o in outs],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return finish(graph, opset, check)


def case(op: str, feeds: dict, inits: dict | None = None, inputs: list[str] | None = None, **kw):
    return (op, feeds, inits, inputs, kw)


def f32s(values) -> np.ndarray:
    return np.asarray(values, np.float32)


X4 = {"x": f32(2, 3, 4, 5, seed=1) * 2}
X3 = {"x": f32(2, 3, 5, seed=1)}
POS = {"x": np.abs(f32(2, 3, 4, seed=1)) + 0.1}
TIES = {"x": np.round(f32(2, 6, 4, seed=1) * 2) / 2}  # halves and repeated values
BOOL2 = {"a": f32(3, 4, seed=1) > 0, "b": f32(3, 4, seed=2) > 0}
INT2 = {"a": i64([[-7, -3, 5, 8], [7, 3, -5, -8]]), "b": i64([[3, -3, 2, -5], [-2, 4, 3, 5]])}
ROUNDS = {"x": f32s([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, -0.3, 0.7, 0.0, -1.2, 3.49, -3.51])}
CMP = {"a": TIES["x"], "b": np.round(f32(2, 6, 4, seed=2) * 2) / 2}
GN = {"s": f32(6, seed=3), "b": f32(6, seed=4)}
NO = ""  # an omitted optional input
I64_MIN, I64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max

MORE_CASES = {
    # activations
    "hardswish": case("HardSwish", X4),
    "hardsigmoid": case("HardSigmoid", X4, alpha=0.3, beta=0.4),
    "hardsigmoid_default": case("HardSigmoid", X4),
    "elu": case("Elu", X4, alpha=0.5),
    "selu": case("Selu", X4),
    "selu_attrs": case("Selu", X4, alpha=1.5, gamma=0.9),
    "celu": case("Celu", X4, alpha=2.0),
    "softplus": case("Softplus", X4),
    "softsign": case("Softsign", X4),
    "prelu_channel_slope": case("PRelu", X4, {"slope": f32(3, 1, 1, seed=2)}),
    "prelu_scalar_slope": case("PRelu", X4, {"slope": f32s([0.25])}),
    "thresholded_relu": case("ThresholdedRelu", X4, alpha=0.5),
    "gelu_20": case("Gelu", X4, opset=20),
    "gelu_tanh_20": case("Gelu", X4, opset=20, approximate="tanh"),
    "erf": case("Erf", X4),
    "mish_18": case("Mish", X4, opset=18),
    "swish_24": case("Swish", X4, opset=24, alpha=0.7),
    "logsoftmax_axis1": case("LogSoftmax", X4, axis=1),
    "logsoftmax_default": case("LogSoftmax", X4),
    "hardmax_axis1": case("Hardmax", X4, axis=1),
    # elementwise
    "sum_variadic_broadcast": case("Sum", X3, {"a": f32(3, 1, seed=2), "b": f32(5, seed=3)}),
    "sum_single": case("Sum", X3),
    "mean_variadic": case("Mean", X3, {"a": f32(3, 1, seed=2), "b": f32(5, seed=3)}),
    "max_two": case("Max", X3, {"a": f32(5, seed=2)}),
    "min_three": case("Min", X3, {"a": f32(3, 1, seed=2), "b": f32(1, 5, seed=3)}),
    "max_int64": case("Max", INT2),
    "pow_scalar": case("Pow", X3, {"e": f32s(2.0)}),
    "pow_tensor": case("Pow", POS, {"e": f32(4, seed=2)}),
    "pow_int_exponent": case("Pow", X3, {"e": i64(3)}),
    "sqrt": case("Sqrt", POS),
    "exp": case("Exp", X3),
    "log": case("Log", POS),
    "neg": case("Neg", X3),
    "abs": case("Abs", X3),
    "reciprocal": case("Reciprocal", POS),
    "floor": case("Floor", ROUNDS),
    "ceil": case("Ceil", ROUNDS),
    "round_half_even": case("Round", ROUNDS),
    "sign": case("Sign", ROUNDS),
    "sin": case("Sin", X3),
    "cos": case("Cos", X3),
    "where": case("Where", {"c": f32(3, 4, seed=3) > 0, "a": f32(3, 4, seed=1)}, {"b": f32(4, seed=2)}),
    "equal_float": case("Equal", CMP),
    "equal_int": case("Equal", INT2),
    "greater": case("Greater", CMP),
    "greater_or_equal": case("GreaterOrEqual", CMP),
    "less": case("Less", CMP),
    "less_or_equal": case("LessOrEqual", CMP),
    "not": case("Not", {"a": BOOL2["a"]}),
    "and": case("And", BOOL2),
    "or": case("Or", BOOL2),
    "xor": case("Xor", BOOL2),
    "mod_int": case("Mod", INT2),
    "mod_int_fmod": case("Mod", INT2, fmod=1),
    "mod_float_fmod": case("Mod", X3, {"d": f32s([1.5, -0.7, 0.4, 2.0, -1.1])}, fmod=1),
    # normalisation, pooling, reductions
    "lrn_5": case("LRN", X4, size=5, alpha=0.5, beta=0.75, bias=1.5),
    "lrn_default": case("LRN", X4, size=3),
    "global_maxpool": case("GlobalMaxPool", X4),
    "global_maxpool_1d": case("GlobalMaxPool", X3),
    "lp_normalization_p2_axis1": case("LpNormalization", X4, axis=1),
    "lp_normalization_p1": case("LpNormalization", X4, p=1),
    "instance_norm": case("InstanceNormalization", X4, {"s": f32(3, seed=3), "b": f32(3, seed=4)}, epsilon=1e-3),
    "layer_norm": case("LayerNormalization", X4, {"s": f32(5, seed=3), "b": f32(5, seed=4)}),
    "layer_norm_axis1_stats": case("LayerNormalization", X4, {"s": f32(3, 4, 5, seed=3)}, outputs=3, axis=1,
                                   epsilon=1e-2),
    # the checker calls GroupNormalization-18 deprecated (scale per group); onnxruntime runs it
    "group_norm_18": case("GroupNormalization", {"x": f32(2, 6, 3, 4, seed=1)}, {"s": f32(2, seed=3),
                                                                                  "b": f32(2, seed=4)},
                          opset=18, num_groups=2, out_type=TensorProto.FLOAT,
                          check=False),
    "group_norm_21": case("GroupNormalization", {"x": f32(2, 6, 3, 4, seed=1)}, GN, opset=21, num_groups=3,
                          out_type=TensorProto.FLOAT),
    "group_norm_21_per_channel_groups": case("GroupNormalization", {"x": f32(2, 6, 5, seed=1)}, GN, opset=21,
                                             num_groups=6, epsilon=1e-3, out_type=TensorProto.FLOAT),
    "reduce_mean_13_attr": case("ReduceMean", X4, opset=13, axes=[1, -1], keepdims=0),
    "reduce_mean_18_input": case("ReduceMean", X4, {"a": i64([2, 3])}, opset=18),
    "reduce_mean_18_all": case("ReduceMean", X4, opset=18, keepdims=0),
    "reduce_mean_18_noop": case("ReduceMean", X4, opset=18, noop_with_empty_axes=1),
    "reduce_sum_13_input": case("ReduceSum", X4, {"a": i64([-3])}, opset=13, keepdims=0),
    "reduce_sum_13_all": case("ReduceSum", X4, opset=13),
    "reduce_sum_int": case("ReduceSum", INT2, inputs=["a"], keepdims=0),
    "reduce_max_18": case("ReduceMax", X4, {"a": i64([1])}, opset=18),
    "reduce_min_17": case("ReduceMin", X4, axes=[0, 2], keepdims=0),
    "reduce_prod_17": case("ReduceProd", POS, axes=[1, 2]),
    "reduce_prod_18": case("ReduceProd", POS, {"a": i64([0])}, opset=18, keepdims=0),
    "reduce_l2_18": case("ReduceL2", X4, {"a": i64([1, 3])}, opset=18),
    "reduce_l1_17": case("ReduceL1", X4, axes=[1]),
    "reduce_sum_square_17": case("ReduceSumSquare", X4, axes=[2], keepdims=0),
    "reduce_sum_square_18": case("ReduceSumSquare", X4, {"a": i64([1])}, opset=18),
    "reduce_log_sum_17": case("ReduceLogSum", POS, axes=[2]),
    "reduce_log_sum_exp_17": case("ReduceLogSumExp", X4, axes=[1]),
    "argmax_axis1": case("ArgMax", TIES, axis=1, keepdims=0),
    "argmax_default": case("ArgMax", TIES),
    "argmin_last_index": case("ArgMin", TIES, axis=2, select_last_index=1),
    "argmax_last_index": case("ArgMax", TIES, axis=-1, keepdims=0, select_last_index=1),
    # shape and layout
    "split_13_input": case("Split", X4, {"s": i64([1, 2])}, outputs=2, opset=13, axis=1),
    "split_13_equal": case("Split", X4, outputs=3, opset=13, axis=1),
    "split_18_num_outputs_uneven": case("Split", X4, outputs=3, opset=18, axis=-1, num_outputs=3),
    "split_18_input": case("Split", X4, {"s": i64([3, 1])}, outputs=2, opset=18, axis=2),
    "tile": case("Tile", X3, {"r": i64([1, 2, 3])}),
    "constant_of_shape_float": case("ConstantOfShape", {"s": i64([2, 3])},
                                    value=numpy_helper.from_array(f32s([1.5]))),
    "constant_of_shape_int": case("ConstantOfShape", {"s": i64([3])}, value=numpy_helper.from_array(i64([7]))),
    "constant_of_shape_default": case("ConstantOfShape", {"s": i64([2, 1, 2])}),
    "size": case("Size", X4),
    "depth_to_space_dcr": case("DepthToSpace", {"x": f32(2, 8, 3, 4, seed=1)}, blocksize=2),
    "depth_to_space_crd": case("DepthToSpace", {"x": f32(2, 8, 3, 4, seed=1)}, blocksize=2, mode="CRD"),
    "space_to_depth": case("SpaceToDepth", {"x": f32(2, 3, 4, 6, seed=1)}, blocksize=2),
    "resize_nearest_asymmetric_floor": case("Resize", X4, {"sc": f32s([1, 1, 2, 2])}, ["x", NO, "sc"], opset=13,
                                            coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "resize_nearest_half_pixel_sizes": case("Resize", X4, {"sz": i64([2, 3, 7, 11])}, ["x", NO, NO, "sz"],
                                            opset=13),
    "resize_nearest_down_prefer_ceil": case("Resize", {"x": f32(1, 2, 9, 10, seed=1)}, {"sc": f32s([1, 1, .5, .6])},
                                            ["x", NO, "sc"], opset=13, nearest_mode="round_prefer_ceil"),
    "resize_nearest_asymmetric_round": case("Resize", X4, {"sc": f32s([1, 1, 2.5, 1.5])}, ["x", NO, "sc"],
                                            opset=13, coordinate_transformation_mode="asymmetric"),
    "resize_nearest_align_corners": case("Resize", X4, {"sz": i64([2, 3, 7, 9])}, ["x", NO, NO, "sz"], opset=13,
                                         coordinate_transformation_mode="align_corners"),
    "resize_linear_half_pixel": case("Resize", X4, {"sc": f32s([1, 1, 2, 2])}, ["x", NO, "sc"], opset=13,
                                     mode="linear"),
    "resize_linear_align_corners": case("Resize", X4, {"sz": i64([2, 3, 7, 9])}, ["x", NO, NO, "sz"], opset=13,
                                        mode="linear", coordinate_transformation_mode="align_corners"),
    "resize_linear_pytorch_half_pixel_down": case("Resize", {"x": f32(1, 2, 9, 10, seed=1)},
                                                  {"sz": i64([1, 2, 4, 1])}, ["x", NO, NO, "sz"], opset=13,
                                                  mode="linear",
                                                  coordinate_transformation_mode="pytorch_half_pixel"),
    "resize_linear_asymmetric": case("Resize", X4, {"sc": f32s([1, 1, 1.5, 2.5])}, ["x", NO, "sc"], opset=13,
                                     mode="linear", coordinate_transformation_mode="asymmetric"),
    "resize_18_axes_sizes": case("Resize", X4, {"sz": i64([6, 8])}, ["x", NO, NO, "sz"], opset=18, axes=[2, 3],
                                 mode="linear"),
    "resize_18_keep_aspect_not_larger": case("Resize", X4, {"sz": i64([8, 20])}, ["x", NO, NO, "sz"], opset=18,
                                             axes=[2, 3], keep_aspect_ratio_policy="not_larger"),
    "resize_19_half_pixel_symmetric": case("Resize", X4, {"sc": f32s([1, 1, 1.7, 2.3])}, ["x", NO, "sc"],
                                           opset=19, mode="linear",
                                           coordinate_transformation_mode="half_pixel_symmetric"),
    "conv_transpose_groups_strides_pads": case("ConvTranspose", {"x": f32(2, 4, 5, 6, seed=1)},
                                               {"w": f32(4, 3, 3, 3, seed=2), "b": f32(6, seed=3)},
                                               group=2, strides=[2, 3], pads=[1, 0, 0, 2], output_padding=[1, 2]),
    "conv_transpose_dilations": case("ConvTranspose", {"x": f32(1, 2, 5, 5, seed=1)}, {"w": f32(2, 3, 3, 2, seed=2)},
                                     dilations=[2, 3], strides=[2, 2], pads=[2, 1, 1, 2], output_padding=[1, 0]),
    "conv_transpose_1d": case("ConvTranspose", {"x": f32(2, 3, 7, seed=1)}, {"w": f32(3, 2, 4, seed=2)},
                              strides=[2]),
    "einsum_batched_matmul": case("Einsum", {"a": f32(2, 3, 4, seed=1), "b": f32(2, 4, 5, seed=2)},
                                  equation="bij, bjk -> bik"),
    "einsum_transpose": case("Einsum", X4, equation="nchw->nhwc"),
    "trilu_upper_k": case("Trilu", {"x": f32(2, 4, 5, seed=1)}, {"k": i64(1)}),
    "trilu_lower": case("Trilu", {"x": f32(2, 4, 5, seed=1)}, upper=0),
    "slice_step2": case("Slice", X4, {"s": i64([1, 0]), "e": i64([5, -1]), "a": i64([3, 2]), "st": i64([2, 2])}),
    "slice_reverse": case("Slice", X4, {"s": i64([-1]), "e": i64([I64_MIN]), "a": i64([1]), "st": i64([-1])}),
    "slice_negative_steps": case("Slice", X4, {"s": i64([10, 3]), "e": i64([0, -10]), "a": i64([-1, 2]),
                                               "st": i64([-2, -3])}),
    "slice_big_end": case("Slice", X4, {"s": i64([1]), "e": i64([I64_MAX]), "a": i64([3]), "st": i64([3])}),
    "cumsum": case("CumSum", X4, {"a": i64(1)}),
    "cumsum_exclusive_reverse": case("CumSum", X4, {"a": i64(-1)}, exclusive=1, reverse=1),
    "cumsum_int": case("CumSum", INT2, {"ax": i64(1)}, ["a", "ax"], exclusive=1),
    "nonzero": case("NonZero", ROUNDS),
    **{f"cast_to_{TensorProto.DataType.Name(t).lower()}": case("Cast", {"x": f32(3, 4, seed=1) * 3}, to=t)
       for t in (TensorProto.BOOL, TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.INT32,
                 TensorProto.INT64, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.FLOAT)},
    "cast_bool_to_float": case("Cast", {"a": BOOL2["a"]}, to=TensorProto.FLOAT),
    "cast_int_to_float16": case("Cast", INT2, inputs=["a"], to=TensorProto.FLOAT16),
    "cast_like": case("CastLike", X3, {"t": i64([0])}),
}


@pytest.mark.parametrize("name", list(MORE_CASES))
def test_more_ops_match_onnxruntime(name):
    op, feeds, inits, inputs, kw = MORE_CASES[name]
    assert_matches_ort(node_model(op, feeds, inits, inputs, **kw), feeds)


def test_lrn_even_size_follows_the_spec():
    """onnxruntime refuses an even size; the spec's window is c - floor((size-1)/2) .. c + ceil((size-1)/2)."""
    x = X4["x"]
    for size in (2, 4):
        model = node_model("LRN", X4, size=size, alpha=0.8, beta=0.6, bias=1.5)
        with torch.no_grad():
            got = OnnxModule(model)({"x": torch.from_numpy(x)})["y"].numpy()
        lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
        square_sum = np.stack([np.square(x[:, max(0, c - lo):c + hi + 1]).sum(1) for c in range(x.shape[1])], 1)
        np.testing.assert_allclose(got, x / (1.5 + 0.8 / size * square_sum) ** 0.6, rtol=1e-5, atol=1e-6)


def test_upsample_opset9_matches_onnxruntime():
    """Upsample exists up to opset 9, which onnxruntime runs but the bridge refuses: the module runs the
    graph relabelled opset 13."""
    feeds = {"x": f32(2, 3, 4, 5, seed=1)}
    for mode, scales in [("nearest", [1, 1, 2, 3]), ("nearest", [1, 1, 1.5, 2.5]), ("linear", [1, 1, 2, 1.5])]:
        model = node_model("Upsample", feeds, {"s": f32s(scales)}, opset=9, mode=mode)
        ref = session(model).run(None, feeds)[0]
        model.opset_import[0].version = 13
        with torch.no_grad():
            got = OnnxModule(model)({"x": torch.from_numpy(feeds["x"])})["y"].numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=EXACT_TOL * max(1.0, float(np.abs(ref).max())))


GRAD_CASES = {  # op, attrs, extra initializers (read after the op's input), opset
    "HardSwish": ({}, {}, 17), "HardSigmoid": ({}, {}, 17), "Elu": ({}, {}, 17), "Selu": ({}, {}, 17),
    "Celu": ({}, {}, 17), "Softplus": ({}, {}, 17), "Softsign": ({}, {}, 17),
    "ThresholdedRelu": (dict(alpha=0.2), {}, 17), "Gelu": ({}, {}, 20), "Erf": ({}, {}, 17), "Mish": ({}, {}, 18),
    "Swish": ({}, {}, 24), "LogSoftmax": (dict(axis=1), {}, 17), "LRN": (dict(size=3, alpha=0.5), {}, 17),
    "PRelu": ({}, {"slope": f32s([[[0.1]], [[0.2]], [[-0.3]]])}, 17),
    "LayerNormalization": ({}, {"scale": f32(5, seed=3), "bias": f32(5, seed=4)}, 17),
    "InstanceNormalization": ({}, {"scale": f32(3, seed=3), "bias": f32(3, seed=4)}, 17),
    "GroupNormalization": (dict(num_groups=3), {"scale": f32(3, seed=3), "bias": f32(3, seed=4)}, 21),
    "Resize": (dict(mode="linear"), {"roi": f32s([]), "scales": f32s([1, 1, 1.5, 2])}, 17),
    "ConvTranspose": (dict(strides=[2, 2], pads=[1, 0, 0, 1]), {"w": f32(3, 2, 3, 3, seed=3)}, 17),
}


@pytest.mark.parametrize("op", list(GRAD_CASES))
def test_differentiable_ops_pass_gradients_upstream(op):
    """x * w -> op -> y: the parameter w upstream (and the op's own parameters) get finite, non-zero
    gradients of a weighted sum of y."""
    attrs, extra, opset = GRAD_CASES[op]
    nodes = [helper.make_node("Mul", ["x", "w_up"], ["h"], name="scale"),
             helper.make_node(op, ["h", *extra], ["y"], name="op", **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list("NCHW"))],
                              initializer=[numpy_helper.from_array(v, k) for k, v in
                                           {"w_up": f32(1, 3, 1, 1, seed=5) * 2, **extra}.items()])
    module = OnnxModule(finish(graph, opset))
    y = module({"x": torch.from_numpy(f32(2, 3, 4, 5, seed=1))})["y"]
    (y * torch.from_numpy(f32(*y.shape, seed=6))).sum().backward()
    for name in ["w_up", *(k for k in extra if k not in ("roi", "scales"))]:
        grad = module.parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def raw_model(op: str, inputs: list[str], outputs: list[str], inits: dict, x_shape, opset: int = 17, **attrs):
    """A one-node model that skips the checker (for what the bridge refuses)."""
    node = helper.make_node(op, inputs, outputs, name="bad", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_empty_tensor_value_info(o) for o in outputs],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


REFUSED = {
    "resize_cubic": (raw_model("Resize", ["x", "", "s"], ["y"], {"s": f32s([1, 1, 2, 2])}, (1, 2, 3, 3), mode="cubic"),
                     "Resize node 'bad': mode 'cubic' is not supported"),
    "resize_tf_crop": (raw_model("Resize", ["x", "", "s"], ["y"], {"s": f32s([1, 1, 2, 2])}, (1, 2, 3, 3),
                                 coordinate_transformation_mode="tf_crop_and_resize"),
                       "Resize node 'bad': coordinate_transformation_mode 'tf_crop_and_resize'"),
    "conv_transpose_auto_pad": (raw_model("ConvTranspose", ["x", "w"], ["y"], {"w": f32(2, 2, 3, 3)}, (1, 2, 4, 4),
                                          auto_pad="SAME_UPPER", strides=[2, 2]),
                                "ConvTranspose node 'bad': auto_pad 'SAME_UPPER' is not supported"),
    "conv_transpose_output_shape": (raw_model("ConvTranspose", ["x", "w"], ["y"], {"w": f32(2, 2, 3, 3)},
                                              (1, 2, 4, 4), output_shape=[9, 9]),
                                    "ConvTranspose node 'bad': the output_shape attribute is not supported"),
    "cast_string": (raw_model("Cast", ["x"], ["y"], {}, (2,), to=TensorProto.STRING),
                    "Cast node 'bad': casting to STRING is not supported"),
    "depth_to_space_3d": (raw_model("DepthToSpace", ["x"], ["y"], {}, (1, 4, 3), blocksize=2),
                          "DepthToSpace node 'bad': only 4-D inputs are supported"),
    "split_uneven": (raw_model("Split", ["x"], ["y0", "y1"], {}, (5, 2)),
                     "Split node 'bad': an axis of 5 cannot be split into 2 outputs"),
    "split_bad_sizes": (raw_model("Split", ["x", "s"], ["y0", "y1"], {"s": i64([2, 2])}, (5, 2)),
                        "Split node 'bad' failed in the torch bridge: "),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_an_op_cannot_do_is_one_line_error_naming_the_node(name):
    model, message = REFUSED[name]
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    with pytest.raises(MergeError) as err:
        OnnxModule(model)({"x": torch.zeros(shape)})
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


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
    model, _ = one_op("Det", (3, 3))
    with pytest.raises(MergeError) as err:
        OnnxModule(model)
    assert str(err.value) == "the torch bridge does not support Det (node 'det_node')"


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
