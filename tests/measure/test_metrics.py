"""Parameter and MAC counts of tiny hand-built models, checked against hand-computed numbers."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.errors import MergeError
from onnxmerge.measure.metrics import count_macs, count_parameters, model_stats, parameter_bytes, parameter_counts


def init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype), name)


def make_model(nodes, inputs, outputs, inits, opset=17, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def conv_gemm_model():
    """x[N,1,8,8] -Conv 4x1x3x3-> [N,4,6,6] -Relu-> Reshape [N,144] -Gemm 10x144 (transB)-> [N,10]."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    inits = [init("w1", (4, 1, 3, 3)), init("b1", (4,)), init("w2", (10, 144)), init("b2", (10,)),
             numpy_helper.from_array(np.array([-1, 144], np.int64), "shape")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)


def test_conv_gemm_params_and_macs_by_hand():
    m = conv_gemm_model()
    onnx.checker.check_model(m)
    # 4*1*3*3 + 4 + 10*144 + 10; the int64 Reshape target is a shape constant, not a parameter
    assert count_parameters(m) == 36 + 4 + 1440 + 10
    assert parameter_bytes(m) == 4 * 1490
    conv = 4 * 6 * 6 * 1 * 3 * 3  # Cout*Hout*Wout*(Cin/groups)*kh*kw
    gemm = 144 * 10  # K*N
    assert count_macs(m) == conv + gemm
    assert count_macs(m, batch=4) == 4 * (conv + gemm)


def test_count_macs_leaves_the_model_alone():
    m = conv_gemm_model()
    before = m.SerializeToString()
    count_macs(m, batch=7)
    assert m.SerializeToString() == before


def test_weight_shared_by_two_nodes_counts_once():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["h2"]),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, np.float32))),
        helper.make_node("Constant", [], ["s"], value_floats=[1.0, 2.0]),
        helper.make_node("Add", ["h2", "h2"], ["y"]),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [init("w", (8, 8))])
    assert count_parameters(m) == 64 + 3 + 2
    assert count_macs(m, batch=3) == 2 * 3 * 8 * 8  # the elementwise Add does not count


def test_depthwise_and_grouped_conv():
    nodes = [
        # depthwise: 6 groups of 1 channel, stride 2, pad 1: 10x10 -> 5x5
        helper.make_node("Conv", ["x", "dw"], ["d"], group=6, strides=[2, 2], pads=[1, 1, 1, 1]),
        # grouped: 6 -> 4 channels in 2 groups of 3, pad 1: 5x5 -> 5x5
        helper.make_node("Conv", ["d", "gw"], ["y"], group=2, pads=[1, 1, 1, 1]),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 10, 10])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [init("dw", (6, 1, 3, 3)), init("gw", (4, 3, 3, 3))])
    assert count_parameters(m) == 54 + 108
    assert count_macs(m, batch=2) == 2 * (6 * 5 * 5 * 1 * 9 + 4 * 5 * 5 * 3 * 9)


def test_batched_matmul_and_gemm_trans_a():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),  # [N,2,3,4] @ [4,5] -> [N,2,3,5]
        helper.make_node("Reshape", ["h", "shape"], ["f"]),  # [6N, 5]
        helper.make_node("Gemm", ["f", "w2"], ["y"], transA=1),  # A^T: [5, 6N] @ [6N, 1]
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [init("w", (4, 5)), init("w2", (6, 1)),
                    numpy_helper.from_array(np.array([6, 5], np.int64), "shape")])
    assert count_macs(m, batch=1) == 2 * 3 * 5 * 4 + 5 * 6 * 1


def test_index_tables_count_apart_from_float_weights():
    codes = numpy_helper.from_array(np.zeros((20, 4), np.int8), "codes")
    big_int64 = numpy_helper.from_array(np.zeros(40, np.int64), "table64")
    nodes = [
        helper.make_node("Cast", ["codes"], ["codes64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["codebook", "codes64"], ["w"]),  # [20,4,3]
        helper.make_node("Gather", ["codebook", "table64"], ["w2"]),
        helper.make_node("Reshape", ["w", "shape"], ["y"]),
    ]
    m = make_model(nodes, [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [init("codebook", (16, 3)), codes, big_int64,
                    numpy_helper.from_array(np.array([20, 12], np.int64), "shape")])
    pc = parameter_counts(m)
    assert (pc.float_params, pc.index_params) == (48, 80 + 40)
    assert (pc.float_bytes, pc.index_bytes) == (48 * 4, 80 * 1 + 40 * 8)
    assert count_parameters(m) == 48 + 120


def test_unknown_shape_names_the_node():
    nodes = [
        helper.make_node("Mystery", ["x"], ["m"], domain="ai.onnxmerge"),
        helper.make_node("Conv", ["m", "w"], ["y"], name="conv_after_custom"),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init("w", (2, 1, 3, 3))],
                   extra_opsets=["ai.onnxmerge"])
    with pytest.raises(MergeError, match="conv_after_custom"):
        count_macs(m)


def test_model_stats_with_file(tmp_path):
    m = conv_gemm_model()
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    s = model_stats(m, path)
    assert s == {"params": 1490, "float_params": 1490, "index_params": 0, "param_bytes": 5960,
                 "file_bytes": path.stat().st_size, "macs": 2736}
    assert model_stats(m)["file_bytes"] is None


def test_torch_export_matches_torch_numel():
    torch = pytest.importorskip("torch")
    import io
    import warnings

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(144, 10))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 1, 8, 8), buf, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N"}})
    m = onnx.load_from_string(buf.getvalue())
    assert count_parameters(m) == sum(p.numel() for p in net.parameters())
    assert count_macs(m, batch=2) == 2 * 2736
