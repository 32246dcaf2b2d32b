"""Latency helper: structure of the results, direction of the ratio, feeds and sessions.

No timing thresholds except the ratio direction, checked with a candidate doing 20x the work.
"""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.errors import MergeError
from onnxmerge.graph.ops import make_session
from onnxmerge.measure.latency import latency_table, machine_info
from onnxmerge.model.runtime import random_feeds
from onnxmerge.model.timing import Step, candidate, compare_latency


def matmul_chain(k: int, width: int = 256, batch_dim="N", name="x"):
    """y = x @ W @ W ... (k MatMuls of width x width): k * batch * width^2 MACs."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((width, width)).astype(np.float32) / width**0.5, "w")
    names = [name] + [f"h{i}" for i in range(1, k)] + ["y"]
    nodes = [helper.make_node("MatMul", [a, "w"], [b]) for a, b in zip(names, names[1:])]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch_dim, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, width])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_make_session_threads():
    s1 = make_session(matmul_chain(1), threads=1)
    opts = s1.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert make_session(matmul_chain(1), threads=None).get_session_options().intra_op_num_threads == 0


def test_make_session_from_path(tmp_path):
    import onnx
    path = tmp_path / "m.onnx"
    onnx.save(matmul_chain(1), str(path))
    assert [i.name for i in make_session(path, 1).get_inputs()] == ["x"]
    assert [i.name for i in make_session(str(path), 1).get_inputs()] == ["x"]


def test_random_feeds_shapes_and_errors():
    feeds = random_feeds(make_session(matmul_chain(1, width=8), 1), batch=5)
    assert feeds["x"].shape == (5, 8) and feeds["x"].dtype == np.float32
    fixed = make_session(matmul_chain(1, width=8, batch_dim=1), 1)
    assert random_feeds(fixed, batch=1)["x"].shape == (1, 8)
    with pytest.raises(MergeError, match="fixed batch dim 1"):
        random_feeds(fixed, batch=4)
    m = matmul_chain(1, width=8)
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "W"
    with pytest.raises(MergeError, match="symbolic dims besides the batch"):
        random_feeds(make_session(m, 1), batch=2)


def test_compare_latency_structure():
    s = make_session(matmul_chain(1, width=16), 1)
    cands = {"one": candidate([s], 2), "two": candidate([s, s], 2)}
    assert len(cands["two"]) == 2 and isinstance(cands["two"][0], Step)
    res = compare_latency(cands, "one", min_rounds=12, max_rounds=12, warmup=1, budget_s=0.0,
                          progress=False)
    assert set(res) == {"one", "two"}
    for r in res.values():
        assert set(r) == {"median_ms", "p10_ms", "p90_ms", "q1_ms", "q3_ms", "runs", "ratio",
                          "ratio_q1", "ratio_q3"}
        assert r["runs"] == 12
        assert 0 < r["p10_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["p90_ms"]
    assert res["one"]["ratio"] == 1.0
    assert res["two"]["ratio"] == pytest.approx(res["one"]["median_ms"] / res["two"]["median_ms"])
    with pytest.raises(MergeError, match="baseline 'three'"):
        compare_latency(cands, "three", progress=False)


def test_min_rounds_wins_over_budget():
    s = make_session(matmul_chain(1, width=8), 1)
    res = compare_latency({"a": candidate([s], 1)}, "a", min_rounds=30, budget_s=0.0, warmup=0,
                          progress=False)
    assert res["a"]["runs"] == 30


def test_ratio_direction_with_20x_the_work():
    # batch 32, width 256: 2.1M MACs per MatMul, so per-call overhead is small next to the work
    fast = candidate([make_session(matmul_chain(1), 1)], 32)
    slow = candidate([make_session(matmul_chain(20), 1)], 32)
    res = compare_latency({"fast": fast, "slow": slow}, "fast", min_rounds=10, max_rounds=40,
                          warmup=2, budget_s=0.5, progress=False)
    assert res["slow"]["ratio"] < 0.5  # slower than the baseline: ratio below 1
    res = compare_latency({"fast": fast, "slow": slow}, "slow", min_rounds=10, max_rounds=40,
                          warmup=0, budget_s=0.5, progress=False)
    assert res["fast"]["ratio"] > 2.0  # faster than the baseline: ratio above 1


def test_latency_table_rows():
    a, b = matmul_chain(1, width=16, name="a"), matmul_chain(1, width=16, name="b")
    rows = latency_table(matmul_chain(2, width=16), [a, b], pack=matmul_chain(2, width=16),
                         batch_sizes=(1, 3), threads=(1, None), budget_s=0.0, min_rounds=5,
                         warmup=1, progress=False)
    assert [(r["batch"], r["threads"]) for r in rows] == [(1, 1), (3, 1), (1, "default"), (3, "default")]
    for r in rows:
        assert r["originals"]["ratio"] == 1.0
        assert r["speedup_vs_originals"] == pytest.approx(
            r["originals"]["median_ms"] / r["merged"]["median_ms"])
        assert r["speedup_vs_pack"] == pytest.approx(r["pack"]["median_ms"] / r["merged"]["median_ms"])
        assert r["merged"]["runs"] == r["originals"]["runs"] == r["pack"]["runs"] >= 5
    no_pack = latency_table(matmul_chain(2, width=16), {"a": a, "b": b}, batch_sizes=(1,), threads=(1,),
                            budget_s=0.0, min_rounds=3, warmup=0, progress=False)
    assert "pack" not in no_pack[0] and "speedup_vs_pack" not in no_pack[0]


def test_machine_info():
    info = machine_info()
    assert info["onnxruntime"] == ort.__version__
    assert info["logical_cores"] >= 1 and info["usable_cores"] >= 1
    assert isinstance(info["cpu"], str)
