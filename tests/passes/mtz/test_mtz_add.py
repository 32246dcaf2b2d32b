"""mtz: adding models to a merged mtz model file (`onnxmerge merged_ab.onnx c.onnx --method mtz`).

The merged model's network is rebuilt from the layout in its metadata and the further models are
zipped into it (the authors' merge_new_task across runs): the same network as one run of all the
models, sharing nothing reproduces every task, and what cannot work is refused in one line."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_mtz import LENETS, NAMES, RESNETS, SAMPLES, calib, outputs, paths

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.data import load_dataset
from onnxmerge.errors import MergeError, UsageError
from onnxmerge.model.contract import read_metadata
from onnxmerge.model.runtime import session

THIRD = {"lenet": "lenet_fashion_seed1.onnx", "resnet": "resnet_fashion.onnx"}  # the model added to A+B
NAMES3 = [*NAMES, "fashion1"]
SETS3 = ("mnist_eval.npz", "fashion_eval.npz", "fashion_eval.npz")


def calib3():
    return calib(NAMES3, SETS3)


def merge_ab(tmp_path, files=LENETS, **params):
    """A+B merged by mtz into a file, as a user would have it; its layers as built, one node per run
    (--fuse off: the timed choice would vary from run to run; fused files: test_mtz_fuse.py)."""
    out = tmp_path / "ab.onnx"
    merge(paths(files), out, method="mtz", names=NAMES, calib=calib(),
          params={"hessian_samples": SAMPLES, "fuse": "off", **params})
    return out


def weights(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("arch", ["lenet", "resnet"])
def test_adding_to_a_merged_file_equals_one_run_of_all_models(tmp_path, arch):
    """The faithful reconstruction: A+B to a file, then C added from that file, is the network of one
    run of A+B+C (same flags, no retraining): same columns, same weights, same outputs. A wrong layout
    or a merged side whose Hessian is not the sum of its tasks' gives other pairs and weights."""
    files = {"lenet": LENETS, "resnet": RESNETS}[arch]
    params = {"share_ratio": 0.5, "hessian_samples": SAMPLES, "fuse": "off"}
    one = merge(paths([*files, THIRD[arch]]), method="mtz", names=NAMES3, calib=calib3(), params=params)
    ab = merge_ab(tmp_path, files, share_ratio=0.5)
    added = merge([str(ab), *paths([THIRD[arch]])], tmp_path / "abc.onnx", method="mtz", names=["fashion1"],
                  calib=calib3(), params=params)
    assert [t.name for t in added.info.tasks] == NAMES3
    assert added.info.layout["spaces"] == one.info.layout["spaces"]
    rows = added.state.figures["mtz"]["layers"]
    for got, want in zip(rows, one.state.figures["mtz"]["layers"][-len(rows):], strict=True):  # C's step of one run
        assert (got["node"], got["shared"]) == (want["node"], want["shared"])
        assert got["cost_optimal"] == pytest.approx(want["cost_optimal"], rel=1e-5)
    got, want = weights(added.model), weights(one.model)
    assert got.keys() == want.keys()
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(w).max()), err_msg=name)
    x = load_dataset(shipped(MODELS / "fashion_eval.npz")).x[:16]
    a, b = outputs(one.model, one.info, x), outputs(added.model, added.info, x)
    for name in NAMES3:
        assert np.abs(a[name] - b[name]).max() <= 1e-5 * max(1.0, np.abs(a[name]).max()), name
    # the merged tasks' metadata is carried over from the merged file (their true sources), and the
    # result records its own layout, so that it can take further tasks in turn
    before = {t.name: t for t in read_metadata(onnx.load(str(ab))).tasks}
    for task in added.info.tasks[:2]:
        assert (task.source, task.sha256, task.outputs) == (before[task.name].source, before[task.name].sha256,
                                                            before[task.name].outputs)
    assert read_metadata(onnx.load(str(tmp_path / "abc.onnx"))).layout["tasks"] == NAMES3
    assert added.state.figures["mtz"]["added_to"] == {"model": str(ab), "tasks": NAMES}


def test_sharing_nothing_in_the_added_step_reproduces_all_three(tmp_path):
    """A+B share half their neurons; C added sharing nothing: A and B compute what the merged file
    computes (their originals there: its sub-models), C its original, all to float rounding."""
    ab = merge_ab(tmp_path, share_ratio=0.5)
    added = merge([str(ab), *paths([THIRD["lenet"]])], method="mtz", names=["fashion1"], calib=calib3(),
                  params={"share_ratio": 0.0})
    assert max(added.info.fidelity["max_rel_diff_random_inputs"].values()) <= 1e-5
    x = load_dataset(shipped(MODELS / "mnist_eval.npz")).x[:32]
    got = outputs(added.model, added.info, x)
    merged = onnx.load(str(ab))
    ref = outputs(merged, read_metadata(merged), x)
    ref["fashion1"] = session(onnx.load(paths([THIRD["lenet"]])[0])).run(None, {"input": x})[0]
    for name in NAMES3:
        assert np.abs(got[name] - ref[name]).max() <= 1e-5 * max(1.0, np.abs(ref[name]).max()), name
    assert any("sub-models" in n for n in added.info.fidelity["notes"])


def _without_layout(src, dst):
    model = onnx.load(str(src))
    keep = [p for p in model.metadata_props if p.key != "onnxmerge.layout"]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    onnx.save(model, str(dst))
    return dst


def _layout_edited(src, dst, edit):
    """The merged file with `edit` applied to its layout (the JSON of onnxmerge.layout)."""
    model = onnx.load(str(src))
    entry = next(p for p in model.metadata_props if p.key == "onnxmerge.layout")
    layout = json.loads(entry.value)
    edit(layout)
    entry.value = json.dumps(layout)
    onnx.save(model, str(dst))
    return dst


def _edited_graph(src, dst):
    """The merged file with the first two runs of its first concatenated layer swapped in the graph
    (runs of equal width: it still runs) while its layout and weights stay as onnxmerge wrote them."""
    model = onnx.load(str(src))
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    concat.input[0], concat.input[1] = concat.input[1], concat.input[0]
    onnx.save(model, str(dst))
    return dst


def test_refusals_name_the_file_and_write_nothing(tmp_path):
    ab = merge_ab(tmp_path, share_ratio=0.5)
    pack = tmp_path / "pack.onnx"
    merge(paths(LENETS), pack, method="pack", names=NAMES)
    assert "onnxmerge.layout" not in {p.key for p in onnx.load(str(pack)).metadata_props}  # other methods: as before
    old = _without_layout(ab, tmp_path / "old.onnx")
    edited = _edited_graph(ab, tmp_path / "edited.onnx")
    second = shutil.copy(ab, tmp_path / "ab2.onnx")
    no_spaces = _layout_edited(ab, tmp_path / "no_spaces.onnx", lambda l: l.pop("spaces"))
    text_zeros = _layout_edited(ab, tmp_path / "text_zeros.onnx", lambda l: l["layers"][0].update(zeros="x"))
    third, resnet = paths([THIRD["lenet"], RESNETS[1]])
    out = tmp_path / "out.onnx"
    cases = [
        ([pack, third], ["fashion1"], calib3(), UsageError, [str(pack), "--method pack"]),
        ([old, third], ["fashion1"], calib3(), UsageError, [str(old), "layout"]),
        ([ab, second], ["fashion1"], calib3(), UsageError, [str(second), "second merged model"]),
        ([third, ab], ["fashion1"], calib3(), UsageError, [str(ab), "first"]),
        ([ab, resnet], ["fashion1"], calib3(), UsageError, [resnet, "architecture", str(ab)]),
        ([ab, third], ["fashion"], calib3(), UsageError, [third, "'fashion'", "already a task", str(ab)]),
        ([ab, third], ["fashion1"], {k: v for k, v in calib3().items() if k != "fashion"}, UsageError,
         ["--calib", "fashion", str(ab)]),
        ([edited, third], ["fashion1"], calib3(), MergeError, [str(edited), "rebuilt", "differs"]),
        ([no_spaces, third], ["fashion1"], calib3(), MergeError, [str(no_spaces), "layout", "corrupt", "spaces"]),
        ([text_zeros, third], ["fashion1"], calib3(), MergeError, [str(text_zeros), "layout", "corrupt"]),
    ]
    for inputs, names, data, error, words in cases:
        with pytest.raises(error) as e:
            merge([str(p) for p in inputs], out, method="mtz", names=names, calib=data,
                  params={"share_ratio": 0.5, "hessian_samples": SAMPLES})
        message = str(e.value)
        assert len(message.splitlines()) == 1, message
        assert all(w in message for w in words), (words, message)
        assert not out.exists()


def test_cli_adds_a_model_to_a_merged_file(tmp_path):
    ab, abc = tmp_path / "ab.onnx", tmp_path / "abc.onnx"
    flags = ["--method", "mtz", "--share-ratio", "0.5", "--hessian-samples", "32", "--no-latency"]
    data = {n: str(shipped(MODELS / s)) for n, s in zip(NAMES3, SETS3)}
    cli = [sys.executable, "-m", "onnxmerge"]
    done = subprocess.run([*cli, *paths(LENETS), "-o", str(ab), "--names", "mnist,fashion", *flags,
                           *[a for n in NAMES for a in ("--calib", f"{n}={data[n]}")]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([*cli, str(ab), *paths([THIRD["lenet"]]), "-o", str(abc), "--names", "fashion1", *flags,
                           *[a for n in NAMES3 for a in ("--calib", f"{n}={data[n]}")],
                           "--data", f"mnist={data['mnist']}", "--data", f"fashion1={data['fashion1']}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    info = read_metadata(onnx.load(str(abc)))
    assert [t.name for t in info.tasks] == NAMES3 and info.method == "mtz"
    assert {o.name for o in onnx.load(str(abc)).graph.output} == {f"{n}/logits" for n in NAMES3}
    assert "fashion1" in done.stdout  # the report, evaluated against the merged tasks' sub-models
    # without --calib for a merged task: one line, exit 2, nothing written
    bad = tmp_path / "bad.onnx"
    done = subprocess.run([*cli, str(ab), *paths([THIRD["lenet"]]), "-o", str(bad), "--names", "fashion1", *flags,
                           "--calib", f"fashion1={data['fashion1']}"], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert str(ab) in done.stderr and not bad.exists()
