"""Bad input: one line naming the file and what is wrong, exit 2 or 1, no traceback, no output file."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import make_model
from onnxmerge.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *fragments: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxmerge: error: "), err
    for f in fragments:
        assert f in lines[0], (f, err)
    assert "Traceback" not in err


def no_output(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == []


def test_not_an_onnx_file(tiny_pair, tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello")
    code, _, err = run_cli(capsys, bad, tiny_pair[0], "-o", tmp_path / "out.onnx")
    assert code == 1
    assert_one_line(err, str(bad), "not an ONNX model")
    assert no_output(tmp_path)


def test_truncated_file(tiny_pair, tmp_path, capsys):
    cut = tmp_path / "cut.onnx"
    data = tiny_pair[1].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    code, _, err = run_cli(capsys, tiny_pair[0], cut, "-o", tmp_path / "out.onnx")
    assert code == 1
    assert_one_line(err, str(cut))
    assert no_output(tmp_path)


def test_unsupported_operator(tiny_pair, tmp_path, capsys):
    odd = tmp_path / "odd.onnx"
    onnx.save(make_model([helper.make_node("Erf", ["input"], ["logits"], name="erf_node")], [],
                         in_shape=("N", 4), out_shape=("N", 4)), str(odd))
    code, _, err = run_cli(capsys, tiny_pair[0], odd, "-o", tmp_path / "out.onnx")
    assert code == 1
    assert_one_line(err, str(odd), "unsupported operator(s): Erf (erf_node)")
    assert no_output(tmp_path)


def test_output_equal_to_an_input_is_refused_and_input_untouched(tiny_pair, tmp_path, capsys):
    before = tiny_pair[0].read_bytes()
    code, _, err = run_cli(capsys, tiny_pair[0], tiny_pair[1], "-o", tiny_pair[0])
    assert code == 2
    assert_one_line(err, str(tiny_pair[0]), "one of the inputs")
    assert tiny_pair[0].read_bytes() == before


def test_missing_output_folder(tiny_pair, tmp_path, capsys):
    code, _, err = run_cli(capsys, *tiny_pair, "-o", tmp_path / "nowhere" / "out.onnx")
    assert code == 2
    assert_one_line(err, "nowhere", "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_missing_input_file(tiny_pair, tmp_path, capsys):
    code, _, err = run_cli(capsys, tiny_pair[0], tmp_path / "absent.onnx", "-o", tmp_path / "out.onnx")
    assert code == 2
    assert_one_line(err, "absent.onnx", "no such file")
    assert no_output(tmp_path)


def test_mismatched_data_shape(tiny_pair, tmp_path, capsys):
    data = tmp_path / "wrong.npz"
    np.savez(data, x=np.zeros((5, 1, 28, 28), np.float32), y=np.zeros(5, np.int64))
    code, _, err = run_cli(capsys, *tiny_pair, "-o", tmp_path / "out.onnx", "--data", f"tiny0={data}",
                           "--no-latency")
    assert code == 1
    assert_one_line(err, "wrong.npz", "tiny0", "(1,28,28)", "(1,8,8)", "input")
    assert no_output(tmp_path)


def test_usage_error_is_one_line(capsys):
    code, _, err = run_cli(capsys, "methods", "--bogus")
    assert code == 2
    assert_one_line(err, "--bogus")


def test_console_script_has_no_traceback_without_debug_and_one_with(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    cmd = [sys.executable, "-m", "onnxmerge", str(bad), str(bad), "-o", str(tmp_path / "out.onnx")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) == 1
    loud = subprocess.run(cmd + ["--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
