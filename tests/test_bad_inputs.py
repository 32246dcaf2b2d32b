"""The bad-input suite (DESIGN.md, "What bad input gets"), run through the command line.

Every case: exit status 2 (usage) or 1 (input that cannot be processed), stderr exactly one line
`onnxmerge: error: ...` that names the offending file or flag and says what is wrong, no traceback,
and nothing new in the output folder (no merged model, no temporary file). Inputs stay untouched.
tests/test_cli_errors.py holds the first cases (a text file, one truncation, Erf, -o equal to an
input, a missing output folder, --data of the wrong shape, ...); these extend them.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli_errors import assert_one_line, run_cli

from conftest import conv_bn_model, init, make_model
from onnxmerge.model.runtime import random_feeds, session

FAST = ("--no-latency", "-q")


def fails(capsys, folder: Path, code: int, argv: list, *fragments: str) -> str:
    """Run the CLI; assert the exit status, one error line holding `fragments`, and that `folder`
    holds exactly what it held before (no output, no temporary file). Returns the error line."""
    before = sorted(os.listdir(folder))
    got, _, err = run_cli(capsys, *argv)
    assert got == code, err
    assert_one_line(err, *fragments)
    assert sorted(os.listdir(folder)) == before, "a file was left behind"
    return err.strip()


def says_what(err: str, about: Path | str) -> None:
    """The line names `about` and says something after it."""
    head = f"onnxmerge: error: {about}: "
    assert err.startswith(head) and err[len(head):].strip(), err


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def samples(n: int = 8, seed: int = 0) -> np.ndarray:
    """`n` samples for the tiny models' (1, 8, 8) input."""
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def assert_valid_output(path: Path) -> None:
    """A merged model that onnx.checker accepts and onnxruntime runs to finite outputs."""
    onnx.checker.check_model(str(path))
    sess = session(path)
    for value in sess.run(None, random_feeds(sess, 2)):
        assert np.all(np.isfinite(value))


# ---------------------------------------------------------------------------------------------
# files that are not ONNX models


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=samples())
    return buf.getvalue()


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("model.txt", "not a model")
    return buf.getvalue()


NOT_ONNX = {
    "empty": lambda: b"",
    "random_bytes": lambda: np.random.default_rng(0).bytes(4096),
    "npz_renamed": _npz_bytes,
    "zip_renamed": _zip_bytes,
    "onnx_text_format": lambda: b'ir_version: 8\ngraph { name: "g" node { op_type: "Relu" } }\n',
}


@pytest.mark.parametrize("kind", NOT_ONNX)
def test_not_an_onnx_file(kind, tiny_pair, tmp_path, capsys):
    bad = tmp_path / f"{kind}.onnx"
    bad.write_bytes(NOT_ONNX[kind]())
    err = fails(capsys, tmp_path, 1, [tiny_pair[0], bad, "-o", tmp_path / "out.onnx", *FAST],
                str(bad), "not an ONNX model")
    says_what(err, bad)


@pytest.mark.parametrize("cut", [1, 8, 0.1, 0.5, 0.9, -1])
def test_truncated_protobuf(cut, tiny_pair, tmp_path, capsys):
    data = tiny_pair[1].read_bytes()
    keep = cut if isinstance(cut, int) and cut > 0 else (len(data) + cut if isinstance(cut, int) else int(len(data) * cut))
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[:keep])
    err = fails(capsys, tmp_path, 1, [tiny_pair[0], bad, "-o", tmp_path / "out.onnx", *FAST], str(bad))
    says_what(err, bad)


@pytest.mark.parametrize("seed", range(5))
def test_bit_flipped_protobuf(seed, tiny_pair, tmp_path, capsys):
    """Seeded bit flips (one to three per file): a flipped file may still parse and even merge; then
    the merged model must be valid. Otherwise one line naming the flipped file, never a traceback."""
    data = tiny_pair[1].read_bytes()
    rng = np.random.default_rng(seed)
    out = tmp_path / "out.onnx"
    for trial in range(5):
        flipped = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            flipped[int(rng.integers(len(flipped)))] ^= 1 << int(rng.integers(8))
        bad = tmp_path / "flip.onnx"
        bad.write_bytes(bytes(flipped))
        before = sorted(os.listdir(tmp_path))
        code, _, err = run_cli(capsys, tiny_pair[0], bad, "-o", out, *FAST)
        assert "Traceback" not in err and "internal error" not in err, (trial, err)
        if code == 0:
            assert not err.strip(), err
            assert_valid_output(out)
            out.unlink()
        else:
            assert code == 1, err
            assert_one_line(err, str(bad))
            assert sorted(os.listdir(tmp_path)) == before


# ---------------------------------------------------------------------------------------------
# models that parse but are unusable


def _undefined_input() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["logits"], name="relu")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _short_weight() -> onnx.ModelProto:
    model = conv_bn_model()
    w1 = next(t for t in model.graph.initializer if t.name == "w1")
    w1.raw_data = w1.raw_data[: len(w1.raw_data) // 2]
    return model


def _not_ssa() -> onnx.ModelProto:
    model = conv_bn_model()
    model.graph.node[3].output[0] = model.graph.node[2].output[0]  # two nodes write one tensor
    return model


@pytest.mark.parametrize("make", [_undefined_input, _short_weight, _not_ssa], ids=lambda f: f.__name__[1:])
def test_model_failing_the_checker(make, tiny_pair, tmp_path, capsys):
    bad = save(make(), tmp_path / "bad.onnx")
    err = fails(capsys, tmp_path, 1, [tiny_pair[0], bad, "-o", tmp_path / "out.onnx", *FAST],
                str(bad), "invalid ONNX model")
    says_what(err, bad)


def test_operator_of_another_domain_is_refused_by_name(tiny_pair, tmp_path, capsys):
    model = conv_bn_model()
    model.graph.node[2].domain = "com.example"
    model.opset_import.add(domain="com.example", version=1)
    bad = save(model, tmp_path / "custom.onnx")
    fails(capsys, tmp_path, 1, [tiny_pair[0], bad, "-o", tmp_path / "out.onnx", *FAST],
          str(bad), "domain onnxruntime's CPU provider does not run: com.example::Relu (relu1)")


def test_operators_beyond_the_papers_are_glue(tiny_pair, tmp_path, capsys):
    """Elu and LpPool (no method knows them) are carried per task: pack merges the model exactly."""
    model = conv_bn_model()
    model.graph.node[2].op_type = "Elu"  # relu1
    model.graph.node[3].op_type = "LpPool"  # pool1 (same kernel_shape and strides)
    odd = save(model, tmp_path / "odd.onnx")
    got, _, err = run_cli(capsys, tiny_pair[0], odd, "-o", tmp_path / "out.onnx", *FAST)
    assert got == 0, err


def _input_dims(dims) -> onnx.ModelProto:
    model = conv_bn_model()
    shape = model.graph.input[0].type.tensor_type.shape
    if dims is None:
        model.graph.input[0].type.tensor_type.ClearField("shape")
        return model
    for d, value in zip(shape.dim, dims):
        if isinstance(value, str):
            d.dim_param = value
        else:
            d.dim_value = value
    return model


SHAPES = {
    "no_shape": (lambda: _input_dims(None), "has no shape"),
    "unknown_channels": (lambda: _input_dims(["N", "C", 8, 8]), "(N,C,8,8): dim(s) 1 are not fixed"),
    "unknown_height": (lambda: _input_dims(["N", 1, "H", 8]), "(N,1,H,8): dim(s) 2 are not fixed"),
    "scalar_input": (lambda: make_model([helper.make_node("Relu", ["input"], ["logits"], name="r")], [],
                                        in_shape=(), out_shape=()), "is a scalar"),
}


@pytest.mark.parametrize("kind", SHAPES)
def test_dynamic_or_missing_input_shape(kind, tiny_pair, tmp_path, capsys):
    make, what = SHAPES[kind]
    bad = save(make(), tmp_path / f"{kind}.onnx")
    fails(capsys, tmp_path, 1, [tiny_pair[0], bad, "-o", tmp_path / "out.onnx", *FAST],
          f"{bad}: input 'input'", what)


def _mlp(seed: int = 0) -> onnx.ModelProto:
    """input (N, 64) -> Gemm -> logits (N, 4): rank 2, where the conv models take rank 4."""
    rng = np.random.default_rng(seed)
    return make_model([helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="fc", transB=1)],
                      [init("w", rng.standard_normal((4, 64))), init("b", rng.standard_normal(4))],
                      in_shape=("N", 64))


@pytest.mark.parametrize("method", ["zipper", "mtz"])
def test_inputs_of_different_ranks_cannot_share_one_input(method, tiny_pair, tmp_path, capsys):
    mlp = save(_mlp(), tmp_path / "mlp.onnx")
    fails(capsys, tmp_path, 2, [tiny_pair[0], mlp, "-o", tmp_path / "out.onnx", "--method", method, *FAST],
          method, "same shape and type")


def test_pack_keeps_inputs_of_different_ranks_apart(tiny_pair, tmp_path, capsys):
    mlp = save(_mlp(), tmp_path / "mlp.onnx")
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, tiny_pair[0], mlp, "-o", out, *FAST)
    assert code == 0, err
    assert sorted(i.name for i in onnx.load(str(out)).graph.input) == ["mlp/input", "tiny0/input"]
    assert_valid_output(out)


def _relu_only() -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["input"], ["logits"], name="relu")], [],
                      in_shape=("N", 4), out_shape=("N", 4))


@pytest.mark.parametrize("method", ["zipper", "codebook", "mtz"])
def test_model_without_weight_bearing_layers_is_refused_by_sharing_methods(method, tmp_path, capsys):
    a, b = save(_relu_only(), tmp_path / "relu_a.onnx"), save(_relu_only(), tmp_path / "relu_b.onnx")
    fails(capsys, tmp_path, 1, [a, b, "-o", tmp_path / "out.onnx", "--method", method, *FAST],
          f"{a}: no weight-bearing layer", f"method {method}", "--method pack")


def test_pack_merges_models_without_weight_bearing_layers(tmp_path, capsys):
    """pack places the graphs side by side: a layerless model is merged as it is, and the merged
    model records that its outputs were checked before it was written."""
    from onnxmerge.model.contract import read_metadata

    a, b = save(_relu_only(), tmp_path / "relu_a.onnx"), save(_relu_only(), tmp_path / "relu_b.onnx")
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, a, b, "-o", out, *FAST)
    assert code == 0, err
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got = session(out).run(None, {"input": x})
    assert all(np.array_equal(g, np.maximum(x, 0)) for g in got)
    assert read_metadata(onnx.load(str(out))).fidelity["output_check"]["passed"] is True


def _with_value(name: str, value: float, constant: bool = False) -> onnx.ModelProto:
    """conv_bn_model with one element of weight `name` set to `value`; `constant`: a Gemm model
    whose bias is a Constant node instead of an initializer."""
    if constant:
        rng = np.random.default_rng(0)
        bias = np.zeros(4, np.float32)
        bias[1] = value
        nodes = [helper.make_node("Constant", [], [name], name="bias_const", value=numpy_helper.from_array(bias)),
                 helper.make_node("Gemm", ["input", "w", name], ["logits"], name="fc", transB=1)]
        return make_model(nodes, [init("w", rng.standard_normal((4, 16)))], in_shape=("N", 16))
    model = conv_bn_model()
    for k, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            array = numpy_helper.to_array(tensor).copy()
            array.flat[3] = value
            model.graph.initializer[k].CopyFrom(numpy_helper.from_array(array, name))
    return model


@pytest.mark.parametrize("name,value,constant", [("w2", np.nan, False), ("w1", np.inf, False),
                                                 ("bias", -np.inf, True)], ids=["nan", "inf", "constant_-inf"])
def test_non_finite_weight_is_refused_at_load(name, value, constant, tiny_pair, tmp_path, capsys):
    bad = save(_with_value(name, value, constant), tmp_path / "bad_weights.onnx")
    fails(capsys, tmp_path, 1, [bad, tiny_pair[0], "-o", tmp_path / "out.onnx", *FAST],
          f"{bad}: weight '{name}'", "NaN or infinite")


def _versions(ir: int | None = None, opset: int | None = None) -> onnx.ModelProto:
    model = conv_bn_model()
    if ir is not None:
        model.ir_version = ir
    if opset is not None:
        model.opset_import[0].version = opset
    return model


@pytest.mark.parametrize("ir,opset,what", [(99, None, "IR version 99"), (None, 99, "opset 99")],
                         ids=["ir_99", "opset_99"])
def test_versions_the_runtime_cannot_run(ir, opset, what, tiny_pair, tmp_path, capsys):
    bad = save(_versions(ir, opset), tmp_path / "future.onnx")
    fails(capsys, tmp_path, 1, [tiny_pair[0], bad, "-o", tmp_path / "out.onnx", *FAST],
          f"{bad}: onnxruntime", "cannot run", what)


def test_opset_too_old_for_the_converter(tiny_pair, tmp_path, capsys):
    """Opset 6: onnx's converter cannot bring this model to opset 13 or 17 (its adapters need fixed
    dims) and onnxruntime has no kernels left for its BatchNormalization(6) and Gemm(6); whichever
    check meets it first, the line names the file and the opset-6 operator or the conversion."""
    old = save(_versions(opset=6), tmp_path / "old.onnx")
    err = fails(capsys, tmp_path, 1, [tiny_pair[0], old, "-o", tmp_path / "out.onnx", *FAST], f"{old}: ")
    assert re.search(r"cannot convert from opset 6 to 1[37]|onnxruntime cannot run this model \(.*\w\(6\) node", err), err


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_external_data_file_missing_or_short(damage, tiny_pair, tmp_path, capsys):
    model = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_model(), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    if damage == "deleted":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[:100])
    fails(capsys, tmp_path, 1, [tiny_pair[0], model, "-o", tmp_path / "out.onnx", *FAST],
          f"{model}: cannot read the model's external data")


# ---------------------------------------------------------------------------------------------
# calibration and evaluation data


DATA = {
    "calib_wrong_shape": ("--calib", lambda: {"x": np.zeros((4, 1, 28, 28), np.float32)}, "(1,28,28)"),
    "data_text_x": ("--data", lambda: {"x": np.array(["a", "b"])}, "must be a numeric array"),
    "calib_complex_x": ("--calib", lambda: {"x": samples().astype(np.complex64)}, "must be a numeric array"),
    "calib_fractional_labels": ("--calib", lambda: {"x": samples(), "y": np.full(8, 0.5)}, "integer class labels"),
    "data_text_labels": ("--data", lambda: {"x": samples(), "y": np.array(["cat"] * 8)}, "integer class labels"),
    "data_no_samples": ("--data", lambda: {"x": np.zeros((0, 1, 8, 8), np.float32)}, "has no samples"),
    "calib_no_samples": ("--calib", lambda: {"x": np.zeros((0, 1, 8, 8), np.float32),
                                              "y": np.zeros(0, np.int64)}, "has no samples"),
    "calib_label_too_big": ("--calib", lambda: {"x": samples(), "y": np.arange(8) % 5}, "label 4"),
    "data_negative_label": ("--data", lambda: {"x": samples(), "y": np.arange(8) - 1}, "label -1"),
    "calib_nan_sample": ("--calib", lambda: {"x": np.where(np.arange(8)[:, None, None, None] == 5, np.nan,
                                                           samples())}, "NaN or infinite values in 1 of its 8"),
}


@pytest.mark.parametrize("kind", DATA)
def test_bad_calibration_or_evaluation_data_is_refused_before_any_work(kind, tiny_pair, tmp_path, capsys):
    flag, arrays, what = DATA[kind]
    path = npz(tmp_path / f"{kind}.npz", **arrays())
    fails(capsys, tmp_path, 1, [*tiny_pair, "-o", tmp_path / "out.onnx", flag, f"tiny0={path}", *FAST],
          str(path), what)


@pytest.mark.parametrize("command", ["calibrate", "eval"])
def test_merged_model_commands_check_labels_against_the_model(command, tiny_pair, tmp_path, capsys):
    merged = tmp_path / "merged.onnx"
    assert run_cli(capsys, *tiny_pair, "-o", merged, *FAST)[0] == 0
    bad = npz(tmp_path / "labels.npz", x=samples(), y=np.full(8, 9))
    flag = "--calib" if command == "calibrate" else "--data"
    argv = [command, merged, flag, f"tiny1={bad}", *FAST]
    argv += ["-o", tmp_path / "calibrated.onnx"] if command == "calibrate" else []
    fails(capsys, tmp_path, 1, argv, str(bad), "label 9", "4 classes")


# ---------------------------------------------------------------------------------------------
# where the output goes


def _output_spelling(kind: str, inputs: list[Path], tmp_path: Path) -> tuple[Path, list]:
    """(an output path that is really one of the inputs or data files, the extra flags)."""
    data = npz(tmp_path / "d.npz", x=samples())
    if kind == "dotdot":
        (tmp_path / "sub").mkdir()
        return tmp_path / "sub" / ".." / inputs[0].name, []
    if kind == "symlink":
        (tmp_path / "link.onnx").symlink_to(inputs[1])
        return tmp_path / "link.onnx", []
    if kind == "hardlink":
        os.link(inputs[0], tmp_path / "hard.onnx")
        return tmp_path / "hard.onnx", []
    if kind == "calib_file":
        return data, ["--calib", f"tiny0={data}"]
    return data, ["--data", f"tiny1={data}"]


@pytest.mark.parametrize("kind", ["dotdot", "symlink", "hardlink", "calib_file", "data_file"])
def test_output_that_is_an_input_under_another_name(kind, tiny_pair, tmp_path, capsys):
    out, extra = _output_spelling(kind, tiny_pair, tmp_path)
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    before = {p: p.read_bytes() for p in files}
    fails(capsys, tmp_path, 2, [*tiny_pair, "-o", out, *extra, *FAST], str(out), "one of the inputs")
    assert {p: p.read_bytes() for p in files} == before  # byte for byte


def test_output_that_is_a_folder(tiny_pair, tmp_path, capsys):
    fails(capsys, tmp_path, 2, [*tiny_pair, "-o", tmp_path, *FAST], f"{tmp_path}: is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 0o555 does not stop root from writing")
def test_output_in_a_read_only_folder(tiny_pair, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        fails(capsys, folder, 2, [*tiny_pair, "-o", folder / "out.onnx", *FAST],
              str(folder / "out.onnx"), "cannot write into the output folder")
    finally:
        folder.chmod(0o755)


def test_output_folder_that_the_process_may_not_write(tiny_pair, tmp_path, capsys, monkeypatch):
    """The same refusal where chmod does not bind (root): the folder's write permission, as the
    operating system answers it, is what is asked (here it answers no for that one folder)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != folder and real_access(p, mode, **kw))
    fails(capsys, folder, 2, [*tiny_pair, "-o", folder / "out.onnx", *FAST],
          str(folder / "out.onnx"), "cannot write into the output folder")


# ---------------------------------------------------------------------------------------------
# flags that contradict each other or the method


FLAGS = {
    "codebook_given_share": (["--method", "codebook", "--share", "1"], "method codebook takes no parameter(s) share"),
    "zipper_given_r": (["--method", "zipper", "--r", "4"], "method zipper takes no parameter(s) r"),
    "pack_given_emit": (["--emit", "native"], "method pack takes no parameter(s) emit"),
    "share_beyond_layers": (["--method", "zipper", "--share", "99"], "--share 99"),
    "share_negative": (["--method", "zipper", "--share", "-1"], "--share -1"),
    "share_ratio_above_one": (["--method", "mtz", "--share-ratio", "1.5"], "--share-ratio 1.5"),
    "codewords_zero": (["--method", "codebook", "--codewords", "0"], "--codewords 0"),
    "threshold_and_share_ratio": (["--method", "mtz", "--threshold", "1", "--share-ratio", "0.5"],
                                  "--threshold and --share-ratio contradict"),
    "tolerance_and_threshold": (["--method", "mtz", "--tolerance", "1", "--threshold", "1"],
                                "--tolerance and --threshold contradict"),
    "tolerance_and_layer_share": (["--method", "mtz", "--tolerance", "1", "--layer-share", "conv1=1"],
                                  "--tolerance and --layer-share contradict"),
    "mtz_separate_inputs": (["--method", "mtz", "--separate-inputs"], "--separate-inputs must not be given"),
    "sweep_with_codebook": (["--method", "codebook", "--sweep"], "--sweep is progressive sharing"),
    "sweep_with_share": (["--method", "zipper", "--sweep", "--share", "1"], "leave out --share"),
    "keep_without_sweep": (["--keep", "2"], "--keep: only with --sweep"),
    "sweep_to_without_sweep": (["--sweep-to", "1"], "--sweep-to: only with --sweep"),
    "steps_without_calib": (["--steps", "5"], "--steps: calibration settings, but no --calib"),
    "no_labels_without_calib": (["--no-labels"], "--no-labels: calibration settings, but no --calib"),
    "opset_beyond_onnx": (["--opset", "99"], "--opset 99: give an opset from 1 to"),
    "opset_zero": (["--opset", "0"], "--opset 0"),
    "names_count": (["--names", "only_one"], "--names: 1 name(s) for 2 model(s)"),
}


@pytest.mark.parametrize("kind", FLAGS)
def test_contradictory_or_out_of_range_flags(kind, tiny_pair, tmp_path, capsys):
    extra, what = FLAGS[kind]
    fails(capsys, tmp_path, 2, [*tiny_pair, "-o", tmp_path / "out.onnx", *extra, *FAST], what)


def test_dump_dir_that_is_a_file(tiny_pair, tmp_path, capsys):
    fails(capsys, tmp_path, 2, [*tiny_pair, "-o", tmp_path / "out.onnx", "--dump-dir", tiny_pair[0], *FAST],
          f"--dump-dir {tiny_pair[0]}: is a file")


# ---------------------------------------------------------------------------------------------
# the final model is validated before it is written (onnxmerge.pipeline.checks.validate_output)


def _nan_calibration(task: str):
    """A stand-in for onnxmerge.calibration.calibrate.calibrate that returns the model with `task`'s weights NaN
    (as a diverged calibration would), without running PyTorch."""
    from onnxmerge.calibration.calibrate import CalibrationResult

    def fake(model, info, teachers, calib, config=None, **kwargs):
        broken = onnx.ModelProto()
        broken.CopyFrom(model)
        for k, tensor in enumerate(broken.graph.initializer):
            if tensor.name.startswith(f"{task}/") and tensor.data_type == TensorProto.FLOAT:
                nan = np.full(tuple(tensor.dims), np.nan, np.float32)
                broken.graph.initializer[k].CopyFrom(numpy_helper.from_array(nan, tensor.name))
        return CalibrationResult(broken)

    return fake


def test_merge_whose_calibration_gives_nan_is_not_written(tiny_pair, tmp_path, capsys, monkeypatch):
    import onnxmerge.api

    monkeypatch.setattr(onnxmerge.api, "calibrate", _nan_calibration("tiny1"))
    calib = npz(tmp_path / "calib.npz", x=samples(), y=np.arange(8) % 4)
    out = tmp_path / "out.onnx"
    fails(capsys, tmp_path, 1, [*tiny_pair, "-o", out, "--calib", f"tiny1={calib}", *FAST],
          f"{out}: not written: task tiny1: output tiny1/logits", "NaN or infinite")


def test_calibrate_command_whose_result_is_nan_is_not_written(tiny_pair, tmp_path, capsys, monkeypatch):
    import onnxmerge.calibration.calibrate

    merged = tmp_path / "merged.onnx"
    assert run_cli(capsys, *tiny_pair, "-o", merged, *FAST)[0] == 0
    monkeypatch.setattr(onnxmerge.calibration.calibrate, "calibrate", _nan_calibration("tiny0"))
    calib = npz(tmp_path / "calib.npz", x=samples())
    out = tmp_path / "calibrated.onnx"
    fails(capsys, tmp_path, 1, ["calibrate", merged, "-o", out, "--calib", f"tiny0={calib}", *FAST],
          f"{out}: not written: task tiny0: output tiny0/logits", "NaN or infinite")


def test_validate_output_catches_a_shape_that_is_not_the_originals(tiny_pair):
    """An output whose shape differs from the original's declaration (here the original is told to
    give 5 classes; the merged model gives 4) is refused with the task and the output named."""
    from onnxmerge.api import merge
    from onnxmerge.errors import MergeError
    from onnxmerge.pipeline.checks import validate_output

    result = merge(tiny_pair)
    assert validate_output(result.model, result.info, {t.name: t.original for t in result.state.tasks})["passed"]
    five = onnx.load(str(tiny_pair[1]))
    five.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    originals = {"tiny0": result.state.tasks[0].original, "tiny1": five}
    with pytest.raises(MergeError, match=r"^m.onnx: not written: task tiny1: output tiny1/logits has shape "
                                         r"\(2, 4\), but the original's is \(2,5\) at batch 2$"):
        validate_output(result.model, result.info, originals, where="m.onnx")
