"""The merge report: its contents for a hand-built 2-task model, the text form and the JSON file."""

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.measure.report import build_report, format_report, write_report_json
from onnxmerge.model.contract import MergedInfo, TaskInfo, read_metadata, write_metadata

RNG = np.random.default_rng(1)
W = {t: RNG.standard_normal((16, 4)).astype(np.float32) for t in "ab"}


def vi(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1, 4, 4] if "x" in name else ["N", 4])


def task_graph(prefix, x, w):
    nodes = [helper.make_node("Flatten", [x], [prefix + "f"]),
             helper.make_node("MatMul", [prefix + "f", prefix + "w"], [prefix + "logits"])]
    return nodes, [numpy_helper.from_array(w, prefix + "w")]


def model(nodes, inputs, outputs, inits):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture()
def merge_files(tmp_path):
    """Originals a.onnx, b.onnx and a merged model with one shared input x (tasks side by side)."""
    paths = {}
    for t in "ab":
        nodes, inits = task_graph("", "x", W[t])
        paths[t] = tmp_path / f"{t}.onnx"
        onnx.save(model(nodes, [vi("x")], [vi("logits")], inits), str(paths[t]))
    nodes, inits = [], []
    for t in "ab":
        n, i = task_graph(f"{t}/", "x", W[t])
        nodes += n
        inits += i
    merged = model(nodes, [vi("x")], [vi("a/logits"), vi("b/logits")], inits)
    info = MergedInfo(version="0.1.0", method="pack", params={"k": 1}, tasks=[
        TaskInfo(name=t, source=f"{t}.onnx", sha256="0" * 64, inputs={"x": "x"},
                 outputs={"logits": f"{t}/logits"}) for t in "ab"])
    write_metadata(merged, info)
    merged_path = tmp_path / "merged.onnx"
    onnx.save(merged, str(merged_path))
    return merged, merged_path, paths


def data(n=40):
    x = RNG.standard_normal((n, 1, 4, 4)).astype(np.float32)
    return {t: SimpleNamespace(x=x, y=RNG.integers(0, 4, n), source=f"{t}.npz") for t in "ab"}


def test_report_contents(merge_files):
    merged, merged_path, paths = merge_files
    info = read_metadata(merged)
    r = build_report(merged_model=merged, merged_path=merged_path, info=info, originals=paths,
                     pack_model=merged, data=data(), latency=True, latency_budget_s=0.0,
                     batch_sizes=(1, 4), threads=(1,), progress=False)
    assert r["method"] == "pack" and r["params"] == {"k": 1}
    assert [t["name"] for t in r["tasks"]] == ["a", "b"]
    sizes = r["sizes"]
    assert sizes["originals"]["a"]["params"] == 64 and sizes["originals_total"]["params"] == 128
    assert sizes["merged"]["params"] == 128 and sizes["merged"]["macs"] == 2 * 16 * 4
    assert sizes["originals_total"]["file_bytes"] == sum(p.stat().st_size for p in paths.values())
    assert sizes["merged"]["file_bytes"] == merged_path.stat().st_size
    assert r["ratios"]["compression_params"] == 1.0 and r["ratios"]["macs"] == 1.0
    for t in "ab":  # the merged model is exactly the originals side by side
        assert r["evaluation"][t]["agreement"] == 1.0
        assert r["evaluation"][t]["accuracy"] == r["evaluation"][t]["original_accuracy"]
    rows = r["latency"]["rows"]
    assert [(row["batch"], row["threads"]) for row in rows] == [(1, 1), (4, 1)]
    assert all("pack" in row and row["merged"]["runs"] >= 30 for row in rows)
    assert r["latency"]["machine"]["onnxruntime"]

    text = format_report(r)
    assert "method pack" in text
    assert "originals together" in text and "merged" in text
    assert "speed-up 1.35x = originals' median time / merged median time" in text
    assert "compression 1.00x params" in text and "MAC ratio 1.00x" in text
    assert "a.npz" in text and "100.00%" in text  # agreement of an exact merge
    # the columns of each table line up: every line of the sizes table has the same length
    lines = text.split("Sizes")[1].split("  compression")[0].strip("\n").splitlines()[1:]
    assert len(lines) == 6 and len({len(line) for line in lines}) == 1


def test_report_without_data_or_latency(merge_files):
    merged, _, paths = merge_files
    r = build_report(merged_model=merged, info=read_metadata(merged), originals=paths,
                     latency=False, progress=False)
    assert r["evaluation"] is None and r["latency"] is None
    assert r["merged_path"] is None and r["sizes"]["merged"]["file_bytes"] is None
    assert r["ratios"]["compression_file_bytes"] is None
    text = format_report(r)
    assert "Latency" not in text and "Evaluation" not in text


def test_write_report_json_atomic(merge_files, tmp_path):
    merged, _, paths = merge_files
    r = build_report(merged_model=merged, info=read_metadata(merged), originals=paths,
                     latency=False, progress=False)
    r["numpy_value"] = np.float32(0.5)
    path = tmp_path / "report.json"
    write_report_json(r, path)
    loaded = json.loads(path.read_text())
    assert loaded["sizes"]["merged"]["params"] == 128 and loaded["numpy_value"] == 0.5
    before = path.read_text()
    with pytest.raises(TypeError):
        write_report_json({"bad": object()}, path)
    assert path.read_text() == before  # a failed write leaves the old report in place
    assert sorted(p.name for p in tmp_path.iterdir() if "report" in p.name) == ["report.json"]
