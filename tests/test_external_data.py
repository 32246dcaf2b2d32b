"""Big models: inputs with external data load and merge, big outputs are written with external data,
atomically, and the report shows peak memory against the inputs' size.

A 2 GB model is not needed: onnxmerge.saving's thresholds are module-level, so lowering them makes
small models take every big-model path (external data written, weights handed to onnxruntime and
shape inference apart, one-tensor-at-a-time writing).
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import conv_bn_model
from onnxmerge import saving
from onnxmerge.api import merge
from onnxmerge.cli import main


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    """`model` at `path` with every tensor of 64 bytes or more in `<name>.data` beside it."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=64)
    return path


@pytest.fixture
def external_pair(tmp_path, monkeypatch) -> list[Path]:
    """Two small models saved with external data in tmp/models; the working directory is elsewhere,
    so that a data file found relative to the CWD instead of the model would fail."""
    folder = tmp_path / "models"
    folder.mkdir()
    paths = [save_external(conv_bn_model(seed=k, channels=8), folder / f"ext{k}.onnx") for k in range(2)]
    for p in paths:  # the fixture really has external data
        assert (folder / f"{p.name}.data").stat().st_size > 0
        assert any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(p), load_external_data=False).graph.initializer)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return paths


@pytest.fixture
def big_paths(monkeypatch):
    """Every model counts as big: written with external data, never serialised whole."""
    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD", 1024)
    monkeypatch.setattr(saving, "WEIGHTS_APART_BYTES", 1024)
    monkeypatch.setattr(saving, "EXTERNAL_TENSOR_BYTES", 64)


def run(path, x: np.ndarray) -> np.ndarray:
    """Outputs of the model file at `path` (by path: its external data is found beside it)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (onnxmerge names them '.<name>.<...>.tmp')."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_pack_of_external_data_inputs_writes_external_data(external_pair, big_paths, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "merged.onnx"
    merge(external_pair, out, method="pack", names=["a", "b"])
    data = out_dir / "merged.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    assert leftovers(out_dir) == []
    stored = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"merged.onnx.data"}  # relative to the model file
    onnx.checker.check_model(str(out))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    got = run(out, x)
    for task, src in zip(["a", "b"], external_pair):
        np.testing.assert_allclose(got[f"{task}/logits"], run(src, x)["logits"], rtol=1e-5, atol=1e-5)


def test_lossy_merge_ignores_where_the_weights_are_stored(external_pair, big_paths, tmp_path):
    """zipper from inputs with external data gives the same weights as from one-file copies."""
    inline = []
    for p in external_pair:
        copy = tmp_path / f"inline_{p.name}"
        onnx.save(onnx.load(str(p)), str(copy))
        assert not (tmp_path / f"{copy.name}.data").exists()
        inline.append(copy)
    params = {"share": 1}
    ext = merge(external_pair, tmp_path / "ext.onnx", method="zipper", names=["a", "b"], params=params)
    ref = merge(inline, tmp_path / "ref.onnx", method="zipper", names=["a", "b"], params=params)
    assert ext.info.fidelity["max_rel_diff_random_inputs"]["a"] > 0  # sharing changed something
    written = onnx.load(str(tmp_path / "ext.onnx"))  # external data loaded back from beside it
    want = {t.name: numpy_helper.to_array(t) for t in ref.model.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_saving_big_then_small_replaces_the_data_file(big_paths, tmp_path, monkeypatch):
    """A one-file model over an output with external data removes the data file it no longer
    needs; writing external data again starts a new file (onnx itself would append to it)."""
    model = conv_bn_model(seed=0, channels=8)
    out = tmp_path / "m.onnx"
    saving.save_atomic(model, out)
    data = tmp_path / "m.onnx.data"
    size = data.stat().st_size
    saving.save_atomic(model, out)
    assert data.stat().st_size == size
    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD", saving.PROTOBUF_LIMIT)
    saving.save_atomic(model, out)
    assert not data.exists()
    assert onnx.load(str(out)).SerializeToString() == model.SerializeToString()
    assert leftovers(tmp_path) == []


def test_one_file_writer_matches_onnx_save(big_paths, tmp_path, monkeypatch):
    """Written one tensor at a time (WEIGHTS_APART_BYTES low, no external data), the file parses
    to the same model."""
    monkeypatch.setattr(saving, "EXTERNAL_DATA_THRESHOLD", saving.PROTOBUF_LIMIT)
    model = conv_bn_model(seed=3, channels=8)
    assert saving.weights_apart(model)
    out = saving.save_atomic(model, tmp_path / "one.onnx")
    assert not (tmp_path / "one.onnx.data").exists()
    assert onnx.load(str(out)).SerializeToString() == model.SerializeToString()


def test_failed_external_write_leaves_nothing(big_paths, tmp_path, monkeypatch):
    """The data file is written, then saving the model fails: neither file nor any temporary remains,
    and the earlier output is untouched."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"earlier output")
    real_save = onnx.save_model

    def failing(model, path, *a, **k):
        assert any(p.name.endswith(".data") for p in Path(path).parent.iterdir())  # data first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", failing)
    with pytest.raises(OSError):
        saving.save_atomic(conv_bn_model(seed=0, channels=8), out)
    monkeypatch.setattr(onnx, "save_model", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert out.read_bytes() == b"earlier output"


def test_approx_size_is_a_little_over(external_pair):
    for p in external_pair:
        model = onnx.load(str(p))
        true = len(model.SerializeToString())
        assert true <= saving.approx_size(model) <= true + 8192


def test_report_shows_peak_memory_and_input_size(external_pair, tmp_path, capsys):
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code = main([str(external_pair[0]), str(external_pair[1]), "-o", str(out), "--no-latency", "-q",
                 "--report", str(report)])
    text = capsys.readouterr().out
    assert code == 0
    memory = json.loads(report.read_text())["memory"]
    on_disk = sum(os.path.getsize(p) + os.path.getsize(f"{p}.data") for p in external_pair)
    assert memory["inputs_disk_bytes"] == on_disk
    assert memory["peak_rss_bytes"] > 0
    assert memory["peak_over_inputs"] == pytest.approx(memory["peak_rss_bytes"] / on_disk)
    assert memory["over_aim"] == (memory["peak_over_inputs"] > 3)
    line = next(l for l in text.splitlines() if l.startswith("Memory: peak"))
    assert f"{memory['peak_over_inputs']:.2f}x the inputs" in line
    # tiny models: the interpreter alone is far over 3x their size, and the report says so
    assert "note: peak memory is over 3x the inputs' size" in text
