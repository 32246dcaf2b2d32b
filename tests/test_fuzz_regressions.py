"""Regression tests from tools/fuzz.py: each case is a minimised crashing input the fuzzer found.

Every test mutates one of the tiny conftest models the way the fuzzer's mutation did on a real model
(or writes the data file it wrote), runs the merge command and asserts the contract for bad input:
exit status 1, one line `onnxmerge: error: <file>: ...` that says what is wrong, no output file.
Before the fixes, each of these was an internal error, or left a merged model behind after the error.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli_errors import assert_one_line, no_output, run_cli

from conftest import EXAMPLES, MODELS, conv_bn_model, shipped


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set_weight(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _initializer(model, name).CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# --- inputs that pass onnx.checker and shape inference but that onnxruntime refuses or cannot run
# (fuzz class "internal error Fail / InvalidArgument at verify.compare / graphs.session")


def duplicate_node_name(m):
    """fuzz mutator rename_node: two nodes of one name (allowed by the checker, refused by onnxruntime)."""
    _node(m, "relu1").name = "conv1"


def weight_contradicts_kernel_shape(m):
    """fuzz mutator resize_initializer: a Conv weight of 5x3 under kernel_shape 3x3."""
    conv = _node(m, "conv1")
    conv.attribute.append(helper.make_attribute("kernel_shape", [3, 3]))
    w = numpy_helper.to_array(_initializer(m, "w1"))
    _set_weight(m, "w1", np.concatenate([w, w[:, :, :2]], axis=2))


def conv_weight_of_wrong_rank(m):
    """fuzz mutator reshape_initializer (squeeze): a 3-D Conv weight."""
    conv = _node(m, "conv1")
    conv.attribute.append(helper.make_attribute("kernel_shape", [3, 3]))
    _set_weight(m, "w1", numpy_helper.to_array(_initializer(m, "w1"))[:, 0])


def gemm_bias_does_not_broadcast(m):
    """fuzz mutator resize_initializer: a Gemm bias one element short of the output width."""
    _set_weight(m, "b2", numpy_helper.to_array(_initializer(m, "b2"))[:-1])


@pytest.mark.parametrize("mutate, fragment", [
    (duplicate_node_name, "two nodes with same node name (conv1)"),
    (weight_contradicts_kernel_shape, "node conv1 (Conv): kernel_shape is not compatible with W shape"),
    (conv_weight_of_wrong_rank, "node conv1 (Conv)"),
    (gemm_bias_does_not_broadcast, "node fc (Gemm)"),
])
def test_model_that_onnxruntime_cannot_run_is_refused(mutate, fragment, tiny_pair, tmp_path, capfd):
    """capfd, not capsys: what onnxruntime's C++ logger writes to the terminal counts as a line too."""
    model = conv_bn_model(seed=1)
    mutate(model)
    onnx.checker.check_model(model)  # the checker lets each of these through: the run decides
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code, _, err = run_cli(capfd, tiny_pair[0], bad, "-o", tmp_path / "out.onnx", "-q", "--no-latency")
    assert code == 1, err
    assert_one_line(err, f"{bad}: onnxruntime cannot run this model", fragment)
    assert "[ONNXRuntimeError]" not in err and ".cc:" not in err  # the reason, not onnxruntime's wrapping
    assert no_output(tmp_path)


def test_model_without_outputs_is_refused(tiny_pair, tmp_path, capsys):
    """fuzz mutator mutate_graph_io (remove_all_outputs): was 'At least one output should be requested'."""
    model = conv_bn_model(seed=1)
    del model.graph.output[:]
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code, _, err = run_cli(capsys, tiny_pair[0], bad, "-o", tmp_path / "out.onnx", "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, f"{bad}: the graph has no outputs")
    assert no_output(tmp_path)


def test_weight_whose_data_does_not_match_its_dims(tiny_pair, tmp_path, capsys):
    """fuzz mutator corrupt_initializer_data (dims): one dim one smaller than the stored data (the
    checker refuses too little data, not too much), and the weight check failed on numpy's reshape
    (an internal error)."""
    model = conv_bn_model(seed=1)
    _initializer(model, "b2").dims[0] -= 1
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code, _, err = run_cli(capsys, tiny_pair[0], bad, "-o", tmp_path / "out.onnx", "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, f"{bad}: weight 'b2' does not hold the data its dims [3] say")
    assert no_output(tmp_path)


def test_model_with_non_finite_outputs_is_refused(tiny_pair, tmp_path, capsys):
    """fuzz mutator mutate_attribute (epsilon): a BatchNormalization epsilon below minus the variance
    makes the model's outputs NaN, with finite weights. pack then called its own exactness check a
    bug (NaN differences), mtz failed on non-finite pair costs, and folding warned on stderr."""
    model = conv_bn_model(seed=1)
    _node(model, "bn1").attribute[0].f = -10.0  # the variances are below 2
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code, _, err = run_cli(capsys, tiny_pair[0], bad, "-o", tmp_path / "out.onnx", "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, f"{bad}: the model's output 'logits' is NaN or infinite on random inputs")
    assert no_output(tmp_path)


def test_batchnorm_fold_that_would_overflow_is_declined_quietly(recwarn):
    """fuzz mutator byte_set (0x7f in a weight's high byte, 2e38): folding the BatchNormalization
    scale into such a weight overflowed float32 (a RuntimeWarning on stderr, then infinite weights);
    the fold is declined, with a note, and the model stays exact."""
    import onnx_graphsurgeon as gs

    from onnxmerge.passes.common.fold_batchnorm import FoldBatchNormPass
    from onnxmerge.pipeline.state import MergeState, Task

    model = conv_bn_model(seed=1, with_dropout=False)
    w = numpy_helper.to_array(_initializer(model, "w1")).copy()
    w[0, 0, 0, 0] = 2e38
    _set_weight(model, "w1", w)
    _initializer(model, "g1").CopyFrom(numpy_helper.from_array(np.full(3, 100, np.float32), "g1"))
    state = MergeState(tasks=[Task("t", model, gs.import_onnx(model))], opset=17, ir_version=model.ir_version)
    FoldBatchNormPass().call(state)
    assert [n.op for n in state.tasks[0].graph.nodes].count("BatchNormalization") == 1  # bn1 kept, bn2 folded
    assert any("BatchNormalization bn1 kept" in note and "not be finite" in note for note in state.notes)
    assert np.isfinite(state.tasks[0].graph.tensors()["w1"].values).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_wrong_intermediate_shape_annotation_does_not_fail_the_report(tiny_pair, tmp_path, capsys):
    """fuzz mutator add_value_info: a value_info that declares the Flatten output (N, N), where N is
    also the batch dim's name. The merge wrote its model, then the report's MAC count took the hint
    for the inferred shape and failed: an error, and a merged model left behind."""
    model = conv_bn_model(seed=1)
    model.graph.value_info.append(helper.make_tensor_value_info("f1", TensorProto.FLOAT, ["N", "N"]))
    odd = tmp_path / "odd.onnx"
    onnx.save(model, str(odd))
    code, out, err = run_cli(capsys, tiny_pair[0], odd, "-o", tmp_path / "out.onnx", "-q", "--no-latency")
    assert code == 0, err
    assert (tmp_path / "out.onnx").is_file() and "MACs" in out


def test_mtz_calibration_data_that_overflows_a_layer(tmp_path, capsys):
    """fuzz mutator data_values (huge): finite --calib values of 3e38 make the second layer's inputs
    infinite; mtz's pair costs became NaN (a RuntimeWarning, then a ValueError inside the pass)."""
    rng = np.random.default_rng(0)
    fine, huge = tmp_path / "fine.npz", tmp_path / "huge.npz"
    np.savez(fine, x=rng.standard_normal((8, 1, 28, 28)).astype(np.float32))
    np.savez(huge, x=np.full((8, 1, 28, 28), 3e38, np.float32))
    models = [shipped(MODELS / "lenet_mnist.onnx"), shipped(MODELS / "lenet_fashion.onnx")]
    code, _, err = run_cli(capsys, *models, "-o", tmp_path / "out.onnx", "--method", "mtz", "--names", "a,b",
                           "--calib", f"a={fine}", "--calib", f"b={huge}", "--hessian-samples", "8",
                           "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, "mtz: layer", "Hessian of task b is not finite")
    assert no_output(tmp_path)


def test_output_that_does_not_follow_the_batch_is_refused(tiny_pair, tmp_path, capsys):
    """fuzz mutator rewire_input: a Gemm that reads its own weight instead of the activations gives
    logits of shape (4, 4) whatever the batch; calibration (cross-entropy against 8 labels) and
    evaluation (accuracy against 32 labels) then failed on numpy and torch shape errors."""
    model = conv_bn_model(seed=1)
    _node(model, "fc").input[0] = "w2"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((8, 1, 8, 8), np.float32), y=np.zeros(8, np.int64))
    code, _, err = run_cli(capsys, tiny_pair[0], bad, "-o", tmp_path / "out.onnx", "--names", "a,b",
                           "--data", f"b={data}", "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, f"{bad}: output 'logits'", "has shape (4,4) at batch 2", "does not follow the input's batch")
    assert no_output(tmp_path)


def test_codebook_weights_too_large_for_kmeans(tmp_path, capsys):
    """fuzz mutator byte_set (0xff in a weight's high byte): one conv2 weight of -3.2e38 in the shipped
    Fashion LeNet (its outputs stay finite: ReLU clips what it reaches). k-means' float32 distances
    overflowed and the codebook pass wrote code indices beyond the codebook (onnxruntime: 'indices
    element out of data bounds')."""
    from onnxmerge.passes.codebook._kmeans import batched_kmeans, max_magnitude

    model = onnx.load(str(shipped(EXAMPLES / "fashion_lenet.onnx")))
    w = numpy_helper.to_array(_initializer(model, "features.4.weight")).copy()
    w[1, 1, 2, 1] = -3.2077497e38
    _set_weight(model, "features.4.weight", w)
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    code, _, err = run_cli(capsys, bad, "-o", tmp_path / "out.onnx", "--method", "codebook", "--preset", "light",
                           "--kmeans-init", "1", "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, "codebook: layer conv2: weights up to 3.21e+38 in magnitude")
    assert no_output(tmp_path)
    # the k-means itself refuses such values (for callers of the API) and takes those just below
    x = np.ones((1, 4, 8), np.float32)
    x[0, 0, 0] = max_magnitude(8) * 2
    with pytest.raises(ValueError, match="k-means in float32 needs them below"):
        batched_kmeans(x, 2)
    x[0, 0, 0] = max_magnitude(8) * 0.99
    assert (batched_kmeans(x, 2).labels < 2).all()


# --- files the fuzzer corrupted (fuzz class "internal error ValidationError / UnicodeDecodeError at
# loading.load_model")


@pytest.mark.parametrize("location", ["missing.bin", "../escape.bin", "/etc/hostname", ""])
def test_external_data_that_is_missing_or_outside_the_folder(location, tiny_pair, tmp_path, capsys):
    """fuzz mutator external_data: a weight stored 'outside the file' where there is nothing, or
    outside the model's folder (onnx refuses to read it: no file outside the folder is opened)."""
    model = conv_bn_model(seed=1)
    t = _initializer(model, "w2")
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    folder = tmp_path / "models"
    folder.mkdir()
    bad = folder / "bad.onnx"
    bad.write_bytes(model.SerializeToString())
    code, _, err = run_cli(capsys, tiny_pair[0], bad, "-o", tmp_path / "out.onnx", "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, f"{bad}: cannot read the model's external data")
    assert no_output(tmp_path)


def test_name_that_is_not_utf8(tiny_pair, tmp_path, capsys):
    """fuzz mutator bit_flip / byte_set: one byte of a node name flipped to 0xff (the checker's
    message quotes the name, which Python could not decode)."""
    data = conv_bn_model(seed=1).SerializeToString()
    assert data.count(b"relu1") == 1
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data.replace(b"relu1", b"relu\xff"))
    code, _, err = run_cli(capsys, tiny_pair[0], bad, "-o", tmp_path / "out.onnx", "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, str(bad), "not valid UTF-8")
    assert no_output(tmp_path)


# --- data (fuzz class "LEFTOVER: files left after an error": the merged model was written, then
# the report refused the data)


def test_empty_data_is_refused_before_the_model_is_written(tiny_pair, tmp_path, capsys):
    """fuzz mutator data_empty: an .npz with no samples passed the shape check and failed only in the
    report, after the merged model had been written."""
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 1, 8, 8), np.float32), y=np.zeros(0, np.int64))
    code, _, err = run_cli(capsys, *tiny_pair, "-o", tmp_path / "out.onnx", "--data", f"tiny0={empty}",
                           "-q", "--no-latency")
    assert code == 1
    assert_one_line(err, "empty.npz", "no samples")
    assert no_output(tmp_path)


# --- the fuzzer itself: its verdicts are the figures the docs quote


@functools.lru_cache(maxsize=None)
def _fuzz():
    """tools/fuzz.py as a module (tools/ is not installed)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("onnxmerge_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_fuzzer_classifies_outcomes():
    fuzz = _fuzz()
    one = "onnxmerge: error: a.onnx: invalid ONNX model (x)\n"
    assert fuzz.classify(1, one, None, [], [], None)[0] == "CLEAN-ERROR"
    assert fuzz.classify(1, one, None, ["out/merged.onnx"], [], None)[0] == "LEFTOVER"
    assert fuzz.classify(1, "Warning: x\n" + one, None, [], [], None) == ("CRASH", "error output is not one line")
    internal = "onnxmerge: internal error: KeyError: 'x' (run with --debug for the traceback)\n"
    assert fuzz.classify(1, internal, None, [], [], None, "api.py:merge") == \
        ("CRASH", "internal error KeyError at api.py:merge")
    wrapped = "onnxmerge: error: pass ZipLayersPass failed (after FoldConstantsPass): IndexError: list index\n"
    assert fuzz.classify(1, wrapped, None, [], [], None, "p.py:f") == \
        ("CRASH", "IndexError in pass ZipLayersPass at p.py:f")
    bug = "onnxmerge: error: method pack is exact, but x: this is a bug\n"
    assert fuzz.classify(1, bug, None, [], [], None)[0] == "CRASH"
    assert fuzz.classify(0, "", None, [], [], "onnx.checker: bad")[0] == "INVALID"
    assert fuzz.classify(0, "", None, [], [], None) == ("OK", "")
    assert fuzz.classify(0, "", None, [], ["m0.onnx"], None) == ("CRASH", "input overwritten")
    assert fuzz.classify(None, "", "SystemExit", [], [], None, "cli.py:main")[0] == "CRASH"


def test_fuzzer_case_is_reproducible_and_runs(tmp_path, monkeypatch):
    """A case is a function of (seed, index); an unmutated one merges cleanly and its output passes
    the fuzzer's checks; an exception inside the merge is a CRASH with the place it came from."""
    import onnxmerge.api

    fuzz = _fuzz()
    corpus = fuzz.Corpus.load()
    case = next(c for c in (fuzz.make_case(corpus, 0, i) for i in range(5000))
                if c.mutators == ["none"] and c.method == "pack" and "--calib" not in c.argv)
    again = fuzz.make_case(corpus, 0, case.index)
    assert (again.files, again.argv) == (case.files, case.argv)
    monkeypatch.chdir(tmp_path)
    result = fuzz.run_case(str(fuzz.prepare(case, tmp_path / "a")), case.argv)
    assert result["outcome"] == "OK", result

    def broken_merge(*args, **kwargs):
        raise KeyError("planted")

    monkeypatch.setattr(onnxmerge.api, "merge", broken_merge)
    result = fuzz.run_case(str(fuzz.prepare(case, tmp_path / "b")), case.argv)
    assert result["outcome"] == "CRASH"
    # the innermost frame of onnxmerge's own code (the command that called the planted merge)
    assert result["class"].startswith("internal error KeyError at cli.py:"), result


def test_pack_of_a_deep_batchnorm_net_is_exact(tmp_path, monkeypatch):
    """Fuzz seed 29 case 1058 (an Add inserted into a zoo EfficientNet): pack folded BatchNorm itself,
    which rounds differently from onnxruntime's Conv+BN fusion in the original: 1.04e-5 relative, a
    reported bug. pack now leaves BatchNorm to onnxruntime as the original does."""
    fuzz = _fuzz()
    case = fuzz.make_case(fuzz.Corpus.load(), 29, 1058)
    assert case.method == "pack" and case.mutators == ["structure:insert_node"]
    monkeypatch.chdir(tmp_path)
    result = fuzz.run_case(str(fuzz.prepare(case, tmp_path / "a")), case.argv)
    assert result["outcome"] == "OK", result
