"""The codebook method (NeuralMerger): pieces and reconstruction, the lookup-table reference of eq. 9,
exactness with a codeword per distinct piece, lossy merges against a numpy reference of the same
transform, the native form, calibration of the codewords, more than two models, the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import EXAMPLES, MODELS, shipped
from onnxmerge.api import load_tasks, merge
from onnxmerge.data import load_dataset
from onnxmerge.errors import UsageError
from onnxmerge.graph.layers import weight_out_axis
from onnxmerge.graph.ops import econv_reference, efc_reference, find_chain, is_native, run_reference, to_portable
from onnxmerge.measure.evaluate import run_task
from onnxmerge.measure.report import build_report, format_report
from onnxmerge.model.runtime import session
from onnxmerge.passes.codebook._codebook import Member, Setting, build_group, parse_layer_params, pieces, reconstruct
from onnxmerge.passes.codebook.emit_native import to_native
from onnxmerge.passes.common import normalise_passes
from onnxmerge.pipeline.checks import EXACT_TOL, task_model
from onnxmerge.pipeline.manager import PassManager

PAIR = [EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx"]
DATA = {"fashion_lenet": EXAMPLES / "fashion_eval.npz", "digits_lenet": EXAMPLES / "digits_eval.npz"}
MIXED = [MODELS / "lenet_mnist.onnx", MODELS / "vgg_fashion.onnx"]  # different architectures (DP alignment)
MIXED_DATA = {"lenet_mnist": MODELS / "mnist_eval.npz", "vgg_fashion": MODELS / "fashion_eval.npz"}


def outputs(model, info, data_paths, n=64):
    sess = session(model)
    return {t.name: run_task(sess, t, load_dataset(shipped(data_paths[t.name])).x[:n]) for t in info.tasks}


def originals(paths, data_paths, n=64):
    return {p.stem: session(shipped(p)).run(None, {"input": load_dataset(shipped(data_paths[p.stem])).x[:n]})[0]
            for p in paths}


def rel(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


# ----------------------------------------------------------------------------------------------
# eqs. 4-8 and eq. 9 on their own


@pytest.mark.parametrize("shape,r", [((6, 5, 3, 3), 2), ((4, 8, 5, 5), 4), ((3, 1, 5, 5), 1), ((7, 10), 3)])
def test_pieces_and_reconstruct_are_inverse(shape, r):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    kind = "conv" if len(shape) == 4 else "fc"
    x = pieces(w, kind, r)  # [V, K, r]
    v, k, _ = x.shape
    # every piece its own codeword: codebook [V, K, r], codes = 0..K-1 in each segment
    codes = np.broadcast_to(np.arange(k), (v, k)).reshape((v, shape[0], *shape[2:]) if kind == "conv" else (v, shape[0]))
    np.testing.assert_array_equal(reconstruct(x, codes, kind, shape[1]), w)


def test_build_group_shares_common_segments_and_gives_deeper_models_their_own():
    rng = np.random.default_rng(1)
    a = Member("a", "a/conv", "conv", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))  # 2 segments at r=2
    b = Member("b", "b/conv", "conv", rng.standard_normal((5, 8, 3, 3)).astype(np.float32))  # 4 segments
    g = build_group("conv", [a, b], Setting(2, 8))
    assert g.codebook.shape == (4, 8, 2)
    assert [c.shape for c in g.codes] == [(2, 4, 3, 3), (4, 5, 3, 3)]
    assert all(c.dtype == np.uint8 for c in g.codes)
    # each code is the nearest codeword of its piece (eq. 8)
    for m, codes in zip([a, b], g.codes):
        x = pieces(m.weight, "conv", 2)
        d = ((x[:, :, None, :] - g.codebook[: x.shape[0], None]) ** 2).sum(-1)
        chosen = np.take_along_axis(d, codes.reshape(x.shape[0], -1, 1).astype(np.int64), 2)[..., 0]
        np.testing.assert_allclose(chosen, d.min(-1), rtol=1e-5, atol=1e-6)


def test_codewords_over_256_use_uint16_codes():
    w = np.random.default_rng(2).standard_normal((400, 2)).astype(np.float32)
    g = build_group("fc", [Member("a", "a/fc", "fc", w)], Setting(1, 300))
    assert g.codes[0].dtype == np.uint16
    assert g.setting.codewords == 300 and not g.exact  # 400 pieces per segment


@pytest.mark.parametrize("seed", range(6))
def test_econv_reference_equals_dense_convolution_of_the_reconstructed_weight(seed):
    """Eq. 9 (tables of codeword dot products, sums of entries by index) against onnxruntime's Conv
    with the dense weight the same codebook and codes stand for; random shapes, strides, pads."""
    rng = np.random.default_rng(seed)
    d, p, kh, kw, r, c = rng.integers(1, 9), rng.integers(1, 7), rng.integers(1, 4), rng.integers(1, 4), \
        rng.integers(1, 5), rng.integers(1, 20)
    v = -(-d // r)
    codebook = rng.standard_normal((v, c, r)).astype(np.float32)
    codes = rng.integers(0, c, (v, p, kh, kw)).astype(np.uint8)
    bias = rng.standard_normal(p).astype(np.float32)
    strides, pads = [int(s) for s in rng.integers(1, 3, 2)], [int(s) for s in rng.integers(0, 2, 4)]
    x = rng.standard_normal((2, d, 9, 8)).astype(np.float32)
    got = econv_reference(x, codebook, codes, bias, strides=strides, pads=pads)
    w = reconstruct(codebook, codes, "conv", d)
    node = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=strides, pads=pads)
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    want = session(model).run(None, {"x": x})[0]
    assert rel(got, want) <= EXACT_TOL


def test_efc_reference_equals_dense_product():
    rng = np.random.default_rng(3)
    codebook = rng.standard_normal((4, 16, 3)).astype(np.float32)
    codes = rng.integers(0, 16, (4, 7)).astype(np.uint16)
    x = rng.standard_normal((5, 11)).astype(np.float32)
    w = reconstruct(codebook, codes, "fc", 11)
    np.testing.assert_allclose(efc_reference(x, codebook, codes), x @ w.T, rtol=1e-5, atol=1e-5)


def test_parse_layer_params():
    assert parse_layer_params("conv2=8/128, fc1=8/64") == {"conv2": Setting(8, 128), "fc1": Setting(8, 64)}
    for bad in ("conv2", "conv2=8", "conv2=0/4", "fc1=4/70000"):
        with pytest.raises(UsageError):
            parse_layer_params(bad)


# ----------------------------------------------------------------------------------------------
# whole merges


@pytest.mark.parametrize("paths,data", [(PAIR, DATA), (MIXED, MIXED_DATA)], ids=["lenet-pair", "lenet-vgg"])
def test_a_codeword_per_distinct_piece_reproduces_the_originals(paths, data):
    paths = [shipped(p) for p in paths]
    # if_larger: a codeword per piece is larger than the dense weights; compress anyway to test it
    result = merge(paths, method="codebook", params={"codewords": 4096, "heads": "codebook", "if_larger": "codebook"})
    layers = result.info.fidelity["codebook_layers"]
    assert layers and all(g["exact"] for g in layers)
    assert max(result.info.fidelity["max_rel_diff_random_inputs"].values()) <= EXACT_TOL
    got, want = outputs(result.model, result.info, data), originals(paths, data)
    for name in want:
        assert rel(got[name], want[name]) <= EXACT_TOL


def numpy_reference(paths, model):
    """The same transform in numpy: each original (normalised) network with every codebook layer's
    weight replaced by `reconstruct(codebook, codes)` read from the merged model's initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = PassManager(normalise_passes()).run(load_tasks(paths))
    import onnx_graphsurgeon as gs
    merged = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    by_name = {n.name: n for n in merged.nodes}
    for task in state.tasks:
        for node in task.graph.nodes:
            twin = by_name.get(f"{task.name}/{node.name}")
            if twin is None or twin.op not in ("Conv", "Gemm") or len(twin.inputs) < 2:
                continue
            found = find_chain(twin.inputs[1])
            if found is None:
                continue
            codebook, codes = found
            kind = "conv" if node.op == "Conv" else "fc"
            w = node.inputs[1].values
            dense = reconstruct(inits[codebook.name], inits[codes.name], kind, w.shape[1] if kind == "conv" else
                                w.shape[1 - weight_out_axis(node)])
            node.inputs[1].values = dense if kind == "conv" or weight_out_axis(node) == 0 else dense.T
    return state


def test_lossy_merge_equals_numpy_reference_of_the_same_transform():
    paths = [shipped(p) for p in PAIR]
    result = merge(paths, method="codebook", params={"preset": "light"})
    assert not any(g["exact"] for g in result.info.fidelity["codebook_layers"])
    state = numpy_reference(paths, result.model)
    got = outputs(result.model, result.info, DATA)
    for task in state.tasks:
        x = load_dataset(shipped(DATA[task.name])).x[:64]
        want = session(task_model(task, state)).run(None, {"input": x})[0]
        assert rel(got[task.name], want) <= EXACT_TOL
        # and it is lossy: the originals differ
        assert rel(got[task.name], originals(paths, DATA)[task.name]) > 1e-3


def test_heads_stay_dense_and_per_task_by_default():
    result = merge([shipped(p) for p in PAIR], method="codebook")
    labels = [g["layer"] for g in result.info.fidelity["codebook_layers"]]
    assert labels == ["conv1", "conv2", "fc1", "fc2"]  # fc3, the head, is not among them
    shared = [t for t in result.model.graph.initializer if t.name.startswith("shared/") and t.name.endswith("codebook")]
    assert len(shared) == 4
    assert {t.data_type for t in result.model.graph.initializer if t.name.endswith("/codes")} == {onnx.TensorProto.UINT8}


def test_layer_params_override_the_preset():
    result = merge([shipped(p) for p in PAIR], method="codebook",
                   params={"preset": "light", "layer_params": "conv2=2/16,fc1=8/32"})
    by = {g["layer"]: g for g in result.info.fidelity["codebook_layers"]}
    assert (by["conv2"]["r"], by["conv2"]["codewords"]) == (2, 16)
    assert (by["fc1"]["r"], by["fc1"]["codewords"]) == (8, 32)
    assert (by["fc2"]["r"], by["fc2"]["codewords"]) == (8, 64)
    with pytest.raises(UsageError, match="no layer conv9"):
        merge([shipped(p) for p in PAIR], method="codebook", params={"layer_params": "conv9=2/16"})


def test_three_models_share_one_codebook_per_layer():
    paths = [shipped(p) for p in [*PAIR, MODELS / "lenet_mnist.onnx"]]
    result = merge(paths, method="codebook")
    for g in result.info.fidelity["codebook_layers"]:
        assert len(g["members"]) == 3
    state = numpy_reference(paths, result.model)
    data = {**DATA, "lenet_mnist": MODELS / "mnist_eval.npz"}
    got = outputs(result.model, result.info, data)
    for task in state.tasks:
        want = session(task_model(task, state)).run(None, {"input": load_dataset(shipped(data[task.name])).x[:64]})[0]
        assert rel(got[task.name], want) <= EXACT_TOL


def test_compression_is_counted_from_file_bytes(tmp_path):
    out = tmp_path / "m.onnx"
    result = merge([shipped(p) for p in PAIR], out, method="codebook", params={"preset": "light"})
    report = build_report(merged_model=result.model, merged_path=out, info=result.info,
                          originals={p.stem: shipped(p) for p in PAIR}, latency=False)
    assert report["ratios"]["compression_file_bytes"] == pytest.approx(
        sum(shipped(p).stat().st_size for p in PAIR) / out.stat().st_size)
    assert report["ratios"]["compression_file_bytes"] > 1.5
    text = format_report(report)
    assert "Codebooks" in text and "fc1" in text


# ----------------------------------------------------------------------------------------------
# the native form


def test_native_form_equals_portable_form_and_converts_back():
    result = merge([shipped(p) for p in MIXED], method="codebook", params={"emit": "native"})
    native = result.model
    assert is_native(native)
    ops = [n.op_type for n in native.graph.node if n.domain == "ai.onnxmerge"]
    assert ops.count("EConv") >= 2 and "EFC" in ops
    assert any(o.domain == "ai.onnxmerge" and o.version == 1 for o in native.opset_import)
    onnx.checker.check_model(native)
    assert result.info.fidelity["native_vs_portable_rel_diff"] <= EXACT_TOL
    # the outputs of the native ops keep their types and shapes, so shape inference continues
    inferred = onnx.shape_inference.infer_shapes(native)
    known = {v.name for v in [*inferred.graph.value_info, *inferred.graph.output]}
    assert all(n.output[0] in known for n in native.graph.node if n.domain == "ai.onnxmerge")
    portable = to_portable(native)
    assert not is_native(portable)
    x = {t.name: load_dataset(shipped(MIXED_DATA[t.name])).x[:8] for t in result.info.tasks}
    feeds = {t.inputs["input"]: x[t.name] for t in result.info.tasks}
    ref = run_reference(native, feeds)
    ort_out = dict(zip([o.name for o in portable.graph.output], session(portable).run(None, feeds)))
    for name in ort_out:
        assert rel(ref[name], ort_out[name]) <= EXACT_TOL
    again, kept = to_native(portable)
    assert sorted(n.op_type for n in again.graph.node if n.domain) == sorted(ops)
    # layers where the lookup costs at least the dense operations keep their dense form: here the
    # one-channel first convolutions (r = 1) and the 10-way heads
    assert kept and all("the lookup takes at least the dense layer's operations" in k for k in kept)
    assert any("features.0/Conv" in k for k in kept)
    notes = result.info.fidelity["notes"]
    assert all(any(k in note for note in notes) for k in kept)


@pytest.mark.parametrize("precision, bits", [("int16", 16), ("int8", 8)])
def test_integer_tables_are_written_on_native_nodes_and_their_rounding_reported(precision, bits):
    result = merge([shipped(p) for p in MIXED], method="codebook",
                   params={"emit": "native", "table_precision": precision})
    native = result.model
    lookups = [n for n in native.graph.node if n.domain == "ai.onnxmerge"]
    assert {n.op_type for n in lookups} == {"EConv", "EFC"}
    integer = [n for n in lookups if n.op_type == "EConv" or bits == 8]  # EFC: int8 only (EFC_TABLE_BITS)
    assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}.get("table_bits") == bits for n in integer)
    assert all(a.name != "table_bits" for n in lookups if n not in integer for a in n.attribute)
    fidelity = result.info.fidelity
    assert fidelity["native_vs_portable_rel_diff"] <= EXACT_TOL  # the rewrite itself: float tables, exact
    # the rounding (numpy reference of the integer tables against the portable form): more than float
    # rounding, and 8 bits round more than 16
    assert EXACT_TOL < fidelity["table_rounding_rel_diff"] < (0.1 if bits == 8 else 1e-3)
    assert any(f"lookup tables in {precision}" in note for note in fidelity["notes"])
    assert not any(a.name == "table_bits" for n in to_portable(native).graph.node for a in n.attribute)


def test_an_unknown_table_precision_is_refused_in_one_line(tmp_path, capsys):
    from onnxmerge.cli import main

    code = main([str(shipped(PAIR[0])), str(shipped(PAIR[1])), "-o", str(tmp_path / "m.onnx"), "--method", "codebook",
                 "--emit", "native", "--table-precision", "int4"])
    assert code != 0 and not (tmp_path / "m.onnx").exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--table-precision" in err and "int4" in err
    code = main([str(shipped(PAIR[0])), str(shipped(PAIR[1])), "-o", str(tmp_path / "m.onnx"), "--method", "codebook",
                 "--table-precision", "int8"])  # with the portable form, which has no tables
    assert code != 0 and not (tmp_path / "m.onnx").exists()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--table-precision int8" in err and "--emit gather" in err


# ----------------------------------------------------------------------------------------------
# calibration: codewords trainable, codes fixed (eq. 11)


def test_calibration_trains_codewords_and_keeps_the_codes():
    torch = pytest.importorskip("torch")
    from onnxmerge.calibration.bridge import OnnxModule
    from onnxmerge.calibration.calibrate import CalibrationConfig

    paths = [shipped(p) for p in PAIR]
    calib = {name: load_dataset(shipped(p)) for name, p in DATA.items()}
    for d in calib.values():
        d.x, d.y = d.x[:128], d.y[:128]
    plain = merge(paths, method="codebook", params={"preset": "light"})
    tuned = merge(paths, method="codebook", params={"preset": "light", "emit": "native"}, calib=calib,
                  calibration=CalibrationConfig(steps=5, lr=1e-3, batch_size=32))
    before = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.model.graph.initializer}
    codes = [n for n in before if n.endswith("/codes")]
    books = [n for n in before if n.endswith("/codebook")]
    assert codes and books
    for n in codes:
        np.testing.assert_array_equal(before[n], after[n])
    assert any(not np.array_equal(before[n], after[n]) for n in books)
    # the bridge runs the native ops like the portable graph
    module = OnnxModule(to_portable(tuned.model))
    native_module = OnnxModule(tuned.model)
    x = {t.name: torch.from_numpy(calib[t.name].x[:4]) for t in tuned.info.tasks}
    feeds = {t.inputs["input"]: x[t.name] for t in tuned.info.tasks}
    with torch.no_grad():
        want, got = module(feeds), native_module(feeds)
    for name in want:
        assert float((got[name] - want[name]).abs().max()) <= EXACT_TOL * max(1.0, float(want[name].abs().max()))


# ----------------------------------------------------------------------------------------------
# the CLI


def test_cli_codebook_merge_and_bad_flags(tmp_path, capsys):
    from onnxmerge.cli import main

    a, b = (str(shipped(p)) for p in PAIR)
    out = tmp_path / "m.onnx"
    assert main([a, b, "-o", str(out), "--method", "codebook", "--preset", "light", "--r", "4",
                 "--layer-params", "fc1=8/32", "--no-latency", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "Codebooks" in text and out.is_file()
    for flags, msg in ((["--layer-params", "fc1=8"], "not R/C"), (["--codewords", "70000"], "65536"),
                       (["--r", "0"], "at least 1"), (["--layer-params", "conv7=4/8"], "no layer conv7")):
        bad = tmp_path / "bad.onnx"
        code = main([a, b, "-o", str(bad), "--method", "codebook", *flags, "--no-latency", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1 and not bad.exists()


def test_one_model_alone_is_compressed_with_its_own_codebooks(tmp_path):
    """The individual-model baseline of the paper's Table 3: the method on one model."""
    path = shipped(PAIR[0])
    exact = merge([path], method="codebook", params={"codewords": 4096, "if_larger": "codebook"})
    assert max(exact.info.fidelity["max_rel_diff_random_inputs"].values()) <= EXACT_TOL
    lossy = merge([path], tmp_path / "one.onnx", method="codebook", params={"preset": "light"})
    assert all(len(g["members"]) == 1 for g in lossy.info.fidelity["codebook_layers"])
    assert (tmp_path / "one.onnx").stat().st_size < path.stat().st_size / 1.3
    with pytest.raises(UsageError, match="at least two models"):
        merge([path], method="pack")


def test_lookup_ops_count_tables_and_additions():
    """EFC with x [1, 10], codebook [2, 4, 5], codes [2, 3]: 2*4*5 table MACs + 3*2 additions."""
    from onnx import TensorProto, helper

    from onnxmerge.measure.metrics import count_macs

    node = helper.make_node("EFC", ["x", "cb", "codes"], ["y"], domain="ai.onnxmerge", in_features=10)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.zeros((2, 4, 5), np.float32), "cb"),
         numpy_helper.from_array(np.zeros((2, 3), np.uint8), "codes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnxmerge", 1)])
    assert count_macs(model, batch=1) == 2 * 4 * 5 + 3 * 2
    assert count_macs(model, batch=4) == 4 * (2 * 4 * 5 + 3 * 2)


def test_cli_falls_back_to_the_portable_form_without_kernels(tmp_path, capsys, monkeypatch):
    from onnxmerge import kernels
    from onnxmerge.cli import main

    monkeypatch.setattr(kernels, "available", lambda: False)
    out = tmp_path / "m.onnx"
    a, b = (str(shipped(p)) for p in PAIR)
    assert main([a, b, "-o", str(out), "--method", "codebook", "--emit", "native", "--no-latency", "--quiet"]) == 0
    assert "writing --emit gather" in capsys.readouterr().err
    model = onnx.load(str(out))
    assert not is_native(model) and any(n.op_type == "Gather" for n in model.graph.node)
