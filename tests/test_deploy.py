"""`onnxmerge deploy`: what a board needs, run as a board runs it.

The deployed folders of a native and a portable merged model (the shipped LeNet pair, codebook) are
run by their own run.py in a fresh venv that has only onnxruntime and numpy (the runtime-only
install), by run.cc compiled against onnxruntime's headers and the wheel's libonnxruntime where the
headers are present, and as ORT-format files; each must give the merged model's outputs here. The
aarch64 folder carries an aarch64 library (cross-compiled where the tools are present)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import EXAMPLES, require_aarch64
from onnxmerge import kernels
from onnxmerge.cli import main
from onnxmerge.deploy import deploy, operators_config
from onnxmerge.graph.ops import make_session
from onnxmerge.kernels import build as kernel_build

TOL = 1e-5
needs_kernels = pytest.mark.skipif(not kernels.available(), reason=kernels.unavailable_reason() or "built")


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Path]:
    """The shipped pair merged with codebook: the native form where the kernels are built, and the portable one."""
    from onnxmerge.api import merge
    from onnxmerge.model.saving import save_atomic

    folder = tmp_path_factory.mktemp("merged")
    paths = [EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx"]
    found = {"portable": save_atomic(merge(paths, method="codebook").model, folder / "portable.onnx")}
    if kernels.available():
        found["native"] = save_atomic(merge(paths, method="codebook", params={"emit": "native"}).model,
                                      folder / "native.onnx")
    return found


def inputs_for(model_path: Path) -> dict[str, np.ndarray]:
    """The shipped evaluation images, 5 per task, by the merged model's input names."""
    model = onnx.load(str(model_path))
    data = {"fashion": np.load(EXAMPLES / "fashion_eval.npz")["x"][:5],
            "digits": np.load(EXAMPLES / "digits_eval.npz")["x"][:5]}
    return {i.name: data[next(k for k in data if i.name.startswith(k))].astype(np.float32) for i in model.graph.input}


def merged_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = make_session(onnx.load(str(model_path)))
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= TOL * max(np.abs(want[name]).max(), 1e-30), name


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory) -> Path:
    """A fresh venv with only onnxruntime and numpy, at this environment's versions."""
    where = tmp_path_factory.mktemp("runtime-venv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", f"onnxruntime=={ort.__version__}",
                           f"numpy=={np.__version__}"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        reason = f"pip could not install onnxruntime and numpy into a fresh venv: {done.stderr.strip()[-300:]}"
        if os.environ.get("ONNXMERGE_REQUIRE_KERNELS"):  # CI: a package registry is reachable
            pytest.fail(reason)
        pytest.skip(reason)
    return python


@pytest.mark.parametrize("form", ["native", "portable"])
def test_a_deployed_folder_runs_in_a_runtime_only_venv(merged, runtime_python, form, tmp_path):
    if form not in merged:
        pytest.skip(kernels.unavailable_reason())
    out = tmp_path / "board"
    deployment = deploy(merged[form], out, ort_format=True)
    expected = {"README.txt", "model.onnx", "model.ort", "operators.config", "run.cc", "run.py"}
    assert set(deployment.files) == expected | ({"libonnxmerge_kernels.so"} if form == "native" else set())
    assert sorted(p.name for p in out.iterdir()) == deployment.files
    assert set(deployment.checks) == {"model.onnx", "model.ort"} and max(deployment.checks.values()) <= TOL
    feeds = inputs_for(merged[form])
    np.savez(tmp_path / "inputs.npz", **feeds)
    want = merged_outputs(merged[form], feeds)
    # the venv has no onnxmerge, torch or scikit-learn: run.py needs none of them
    probe = subprocess.run([str(runtime_python), "-c", "import importlib.util as u; "
                            "print([m for m in ('onnxmerge', 'torch', 'sklearn', 'onnx') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stdout
    for model_file in ("model.onnx", "model.ort"):
        saved = tmp_path / f"{model_file}.npz"
        done = subprocess.run([str(runtime_python), str(out / "run.py"), str(tmp_path / "inputs.npz"), "--model",
                               str(out / model_file), "--save", str(saved)], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "fashion_lenet/logits: shape [5, 10]" in done.stdout
        with np.load(saved) as got:
            assert_close(dict(got), want)


@needs_kernels
def test_run_cc_builds_against_onnxruntime_and_gives_the_same_outputs(merged, tmp_path):
    include = kernel_build.find_include_dir()
    if include is None:
        pytest.skip("onnxruntime's C/C++ headers not found (ONNXRUNTIME_INCLUDE_DIR)")
    out = tmp_path / "board"
    deploy(merged["native"], out)
    # the wheel's libonnxruntime, under the soname the program asks for
    wheel_lib = next((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libonnxruntime.so.1").symlink_to(wheel_lib)
    program = tmp_path / "run"
    compiled = subprocess.run(["g++", "-std=c++17", "-O1", str(out / "run.cc"), f"-I{include}",
                               str(tmp_path / "lib" / "libonnxruntime.so.1"), f"-Wl,-rpath,{tmp_path / 'lib'}",
                               "-o", str(program)], capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    model = onnx.load(str(out / "model.onnx"))
    feeds = {i.name: v[:1] for i, v in zip(model.graph.input, inputs_for(out / "model.onnx").values())}
    for k, i in enumerate(model.graph.input):
        feeds[i.name].astype("<f4").tofile(tmp_path / f"in.{k}.f32")
    done = subprocess.run([str(program), "model.onnx", str(tmp_path / "in"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=out, timeout=120)
    assert done.returncode == 0, done.stderr
    want = merged_outputs(merged["native"], feeds)
    got = {o.name: np.fromfile(tmp_path / f"out.{k}.f32", "<f4").reshape(want[o.name].shape)
           for k, o in enumerate(model.graph.output)}
    assert_close(got, want)


@needs_kernels
def test_emit_gather_deploys_the_portable_form_of_a_native_model(merged, tmp_path):
    deployment = deploy(merged["native"], tmp_path / "board", emit="gather")
    assert not deployment.native and "libonnxmerge_kernels.so" not in deployment.files
    assert "ai.onnxmerge" not in (tmp_path / "board" / "operators.config").read_text()
    assert deployment.checks["model.onnx"] <= TOL
    assert "any build" in deployment.summary()


@needs_kernels
def test_a_model_of_integer_tables_deploys_as_it_is_and_its_portable_form_says_what_it_computes(tmp_path):
    from onnxmerge.api import merge
    from onnxmerge.model.saving import save_atomic

    paths = [EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx"]
    int8 = save_atomic(merge(paths, method="codebook", params={"emit": "native", "table_precision": "int8"}).model,
                       tmp_path / "int8.onnx")
    as_is = deploy(int8, tmp_path / "native")
    assert as_is.native and as_is.checks["model.onnx"] <= TOL  # the kernels' own int8 numbers
    portable = deploy(int8, tmp_path / "portable", emit="gather")
    assert portable.checks["model.onnx"] <= TOL  # against the merged model's numbers with fp32 tables
    assert any("computes fp32 lookup tables" in note for note in portable.notes)


def test_the_aarch64_folder_carries_an_aarch64_library(merged, tmp_path, aarch64_library, monkeypatch):
    """The library deploy cross-compiles (kernel_build.build for aarch64) is conftest's, built once a
    session by kernels/build.py's command line, which calls the same build."""
    require_aarch64("headers", "kernels")

    def built(out, target):
        assert target == "aarch64"
        return Path(shutil.copy2(aarch64_library, Path(out) / kernel_build.LIBRARY_NAME))

    monkeypatch.setattr(kernel_build, "build", built)
    deployment = deploy(merged["native"], tmp_path / "board", arch="aarch64")
    library = tmp_path / "board" / "libonnxmerge_kernels.so"
    assert library.read_bytes()[18] == 183  # ELF e_machine: EM_AARCH64
    assert deployment.checks == {} and any("not run here" in n for n in deployment.notes)
    assert "for aarch64 with custom-op support" in deployment.summary()


def aarch64_python_or_skip() -> tuple[list[str], dict]:
    """The command and environment of the aarch64 Python that tools/aarch64_python.sh prepared
    ($ONNXMERGE_AARCH64_PYTHON), with the cross tools to build the kernels; skipped (failed where
    ONNXMERGE_REQUIRE_CROSS is set) with what is missing."""
    root = os.environ.get("ONNXMERGE_AARCH64_PYTHON")
    ready = root and (Path(root) / "root" / "usr" / "bin" / "python3.11").is_file()
    require_aarch64("qemu", "headers", "kernels", missing=() if ready else (
        "no aarch64 Python (run tools/aarch64_python.sh DIR and set ONNXMERGE_AARCH64_PYTHON=DIR)",))
    root = Path(root)
    return ["qemu-aarch64", "-L", str(root / "root"), str(root / "root" / "usr" / "bin" / "python3.11")], \
        {**os.environ, "PYTHONPATH": str(root / "site")}


def test_the_aarch64_folder_runs_in_onnxruntime_s_aarch64_wheel_under_qemu(merged, tmp_path):
    """End to end on aarch64 (emulated): the deployed run.py in onnxruntime's aarch64 wheel, with the
    cross-compiled kernels registered, for model.onnx and model.ort; outputs as the merged model's here."""
    python, env = aarch64_python_or_skip()
    out = tmp_path / "board"
    deploy(merged["native"], out, arch="aarch64", ort_format=True)
    feeds = inputs_for(merged["native"])
    np.savez(tmp_path / "inputs.npz", **feeds)
    want = merged_outputs(merged["native"], feeds)
    for model_file in ("model.onnx", "model.ort"):
        saved = tmp_path / f"{model_file}.npz"
        done = subprocess.run([*python, "run.py", str(tmp_path / "inputs.npz"), "--model", model_file, "--save",
                               str(saved)], cwd=out, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        with np.load(saved) as got:
            assert_close(dict(got), want)


def test_the_operator_list_names_every_operator_by_domain_and_opset(merged):
    model = onnx.load(str(merged["portable"]))
    lines = [line for line in operators_config(model).splitlines() if not line.startswith("#")]
    listed = {(d, op) for d, _, ops in (line.split(";") for line in lines) for op in ops.split(",")}
    assert listed == {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert all(line.split(";")[1] == str(opset) for line in lines if line.startswith("ai.onnx;"))


def test_bad_deploys_are_one_line_errors_and_leave_nothing(merged, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    (tmp_path / "bad.onnx").write_text("not a model")
    cases = {
        "exists and is not an empty folder": [str(merged["portable"]), "-o", str(tmp_path / "taken")],
        "no such file": [str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "a")],
        "not an ONNX model": [str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "b")],
        "not one of": [str(merged["portable"]), "-o", str(tmp_path / "c"), "--arch", "riscv64"],
    }
    for message, argv in cases.items():
        assert main(["deploy", *argv]) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "taken"]  # no partial folder, nothing beside
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_a_failed_deploy_leaves_no_folder(merged, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")  # the cross build fails after the model is written
    if "native" not in merged:
        pytest.skip(kernels.unavailable_reason())
    assert main(["deploy", str(merged["native"]), "-o", str(tmp_path / "board"), "--arch", "aarch64"]) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_cli_prints_what_the_board_needs(merged, tmp_path, capsys):
    assert main(["deploy", str(merged["portable"]), "-o", str(tmp_path / "board")]) == 0
    out = capsys.readouterr().out
    assert "pip install onnxruntime numpy" in out and "any build" in out
    assert (tmp_path / "board" / "README.txt").read_text().strip() == out.strip()


def test_the_readme_board_commands_run_in_a_runtime_only_venv(merged, runtime_python, tmp_path):
    """README's "Deploying on a board": its deploy command here, then its board lines as written, with
    the runtime-only venv's pip and python first on PATH."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Deploying on a board", 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"((?:\n {4}\S.*)+)", section)]
    deploy_line, board_lines = blocks[0], blocks[1].splitlines()
    assert deploy_line == "onnxmerge deploy merged.onnx -o board" and board_lines[0] == "cd board"
    shutil.copy(merged["portable"], tmp_path / "merged.onnx")
    done = subprocess.run([sys.executable, "-m", *shlex.split(deploy_line)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PATH": f"{runtime_python.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", "-ec", "\n".join(board_lines)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "fashion_lenet/logits: shape [1, 10]" in done.stdout and "digits_lenet/logits" in done.stdout
