"""Big models: inputs with external data load and merge, big outputs are written with external data,
atomically, and the report shows peak memory against the inputs' size.

A 2 GB model is not needed: onnxmerge.model.saving's thresholds are module-level, so lowering them makes
small models take every big-model path (external data written, weights handed to onnxruntime and
shape inference apart, one-tensor-at-a-time writing).
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from conftest import conv_bn_model
from onnxmerge.api import merge
from onnxmerge.cli import main
from onnxmerge.model import saving


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


def test_check_session_computes_on_the_arrays_in_place(big_paths):
    """A session given a big model's weights as arrays computes on those very arrays: onnxruntime
    holds no copy of them (nor a pre-packed one), so checking a model costs no second copy of its
    weights. Changed in place, the arrays change the outputs of the session already made."""
    from onnxmerge.model.runtime import random_feeds, session

    model = conv_bn_model(seed=0, channels=8)
    light, moved = saving.split_weights(model)
    arrays = {stub.name: numpy_helper.to_array(tensor).copy() for stub, tensor in moved}
    assert "w2" in arrays  # the Gemm's weight is among them (pre-packing would copy it)
    sess = session(light, weights=arrays)
    feeds = random_feeds(sess, 2)
    before = sess.run(None, feeds)[0]
    np.testing.assert_allclose(before, session(model).run(None, feeds)[0], rtol=1e-6)
    arrays["w2"] *= 2
    after = sess.run(None, feeds)[0]
    fresh = session(light, weights={k: v.copy() for k, v in arrays.items()}).run(None, feeds)[0]
    assert not np.allclose(after, before)
    np.testing.assert_array_equal(after, fresh)


def test_optimised_session_on_arrays_runs_the_model(big_paths):
    """With onnxruntime's optimisations and pre-packing (timing, evaluation), a big model's session
    on its arrays computes what the model does."""
    from onnxmerge.model.runtime import random_feeds, session

    model = conv_bn_model(seed=1, channels=8)
    assert saving.weights_apart(model)
    want_sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got_sess = session(model, optimize=True, threads=None)
    feeds = random_feeds(got_sess, 3)
    np.testing.assert_allclose(got_sess.run(None, feeds)[0], want_sess.run(None, feeds)[0], rtol=1e-5, atol=1e-6)


def test_export_with_release_frees_the_graph_arrays(big_paths):
    """Exported with `release`, the graph's weights are held once, by the model: each array is
    freed as it is copied into the model, although graphsurgeon's graph copies (every pass makes
    some) leave tensor copies in reference cycles that point at the arrays. Python's automatic
    collection is off here: it must not be what frees them."""
    import gc
    import weakref

    from onnxmerge.graph.convert import import_graph, to_model

    model = conv_bn_model(seed=2, channels=8)
    graph = import_graph(model)
    arrays = {t.name: t.values for t in graph.tensors().values()
              if isinstance(t, gs.Constant) and t.values.nbytes >= saving.EXTERNAL_TENSOR_BYTES}
    assert len(arrays) >= 2
    want = {name: a.copy() for name, a in arrays.items()}
    refs = {name: weakref.ref(a) for name, a in arrays.items()}
    del arrays
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        graph.copy()  # the cyclic garbage a pass leaves behind
        exported = to_model(graph, 17, 8, release=[])
        alive = [name for name, ref in refs.items() if ref() is not None]
    finally:
        if was_enabled:
            gc.enable()
    assert alive == []
    got = {t.name: numpy_helper.to_array(t) for t in exported.graph.initializer}
    for name, values in want.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
        np.testing.assert_array_equal(graph.tensors()[name].values, values, err_msg=name)  # read from the model


def test_one_file_writer_writes_each_tensor_as_protobuf_does():
    """The one-file writer writes a tensor in pieces (its data read once, not serialised with the
    rest): the pieces are exactly the tensor's serialised bytes, whatever fields it has."""
    tensors = list(conv_bn_model(seed=0, channels=8).graph.initializer)
    extra = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "x")
    extra.doc_string = "fields before and after raw_data"
    extra.data_location = onnx.TensorProto.DEFAULT
    entry = extra.metadata_props.add()
    entry.key, entry.value = "k", "v"
    tensors += [extra, onnx.helper.make_tensor("listed", onnx.TensorProto.FLOAT, [2], [1.0, 2.0]),
                numpy_helper.from_array(np.array([True, False]), "flags")]
    for tensor in tensors:
        assert b"".join(saving._tensor_pieces(tensor)) == tensor.SerializeToString(), tensor.name
