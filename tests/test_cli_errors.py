"""Bad input: one line naming the file and what is wrong, exit 2 or 1, no traceback, no output file."""

import os
import subprocess
import sys

import numpy as np
import onnx

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


def test_report_path_is_checked_before_any_work(tiny_pair, tmp_path, capsys):
    before = tiny_pair[1].read_bytes()
    code, _, err = run_cli(capsys, *tiny_pair, "-o", tmp_path / "out.onnx", "--report", tiny_pair[1], "--no-latency")
    assert code == 2 and tiny_pair[1].read_bytes() == before
    assert_one_line(err, "one of the inputs")
    code, _, err = run_cli(capsys, *tiny_pair, "-o", tmp_path / "out.onnx", "--report", tmp_path / "no" / "r.json")
    assert code == 2
    assert_one_line(err, "does not exist")
    assert no_output(tmp_path)


def test_unknown_original_task_and_missing_original_file(tiny_pair, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert run_cli(capsys, *tiny_pair, "-o", out, "--no-latency")[0] == 0
    code, _, err = run_cli(capsys, "eval", out, "--original", f"typo={tiny_pair[0]}", "--no-latency")
    assert code == 2
    assert_one_line(err, "no task named 'typo'")
    code, _, err = run_cli(capsys, "eval", out, "--original", f"tiny0={tmp_path / 'gone.onnx'}", "--no-latency")
    assert code == 2
    assert_one_line(err, "gone.onnx: no such file")


def test_calibrate_refuses_to_overwrite_an_original(tiny_pair, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert run_cli(capsys, *tiny_pair, "-o", out, "--no-latency")[0] == 0
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32))
    before = tiny_pair[0].read_bytes()
    code, _, err = run_cli(capsys, "calibrate", out, "-o", tiny_pair[0], "--calib", f"tiny0={data}")
    assert code == 2 and tiny_pair[0].read_bytes() == before
    assert_one_line(err, "one of the inputs")


def test_sweep_flag_errors(tiny_pair, tmp_path, capsys):
    code, _, err = run_cli(capsys, *tiny_pair, "-o", tmp_path / "out.onnx", "--method", "zipper", "--sweep")
    assert code == 2
    assert_one_line(err, "--calib")
    code, _, err = run_cli(capsys, *tiny_pair, "-o", tmp_path / "out.onnx", "--method", "zipper", "--sweep",
                           "--no-latency")
    assert code == 2
    assert_one_line(err, "does not take --no-latency")
    assert no_output(tmp_path)


def test_unnamed_nodes_and_odd_file_names(tmp_path):
    """Nodes without names (allowed by ONNX) get deterministic names; a file name that is no valid
    task name still gives one; the merged file is readable like any other file."""
    from conftest import conv_bn_model
    from onnxmerge.api import merge

    paths = []
    for k, name in enumerate((".hidden.onnx", "-dash.onnx")):
        m = conv_bn_model(seed=k)
        for node in m.graph.node:
            node.name = ""
        paths.append(tmp_path / name)
        onnx.save(m, str(paths[-1]))
    a = merge(paths, tmp_path / "a.onnx", verify_passes=True)
    merge(paths, tmp_path / "b.onnx")
    assert [t.name for t in a.info.tasks] == ["t.hidden", "t-dash"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.onnx").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
