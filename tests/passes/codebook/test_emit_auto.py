"""`--emit auto`: every layer with a native form is timed against its dense layer on this machine and
the faster form is kept, while the whole model runs faster than its portable form. The timings
themselves are not asserted (machines are noisy): the harness must time the same computation both
ways, and the model must hold exactly the nodes the timings chose; without built kernels auto
writes the portable form and says so."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import EXAMPLES, shipped
from onnxmerge import kernels
from onnxmerge.api import merge
from onnxmerge.graph.ops import shaped_graph, to_portable
from onnxmerge.kernels import DOMAIN
from onnxmerge.model.runtime import session
from onnxmerge.passes.codebook import emit_auto
from onnxmerge.passes.codebook.emit_native import to_native

PAIR = [shipped(EXAMPLES / "fashion_lenet.onnx"), shipped(EXAMPLES / "digits_lenet.onnx")]
PARAMS = {"preset": "light"}
needs_kernels = pytest.mark.skipif(not kernels.available(), reason=kernels.unavailable_reason() or "built")


@pytest.fixture(scope="module")
def portable():
    return merge(PAIR, method="codebook", params=PARAMS, progress=False).model


@needs_kernels
def test_the_harness_times_each_native_node_alone_against_the_same_dense_layer(portable):
    native, _ = to_native(portable)
    nodes = [n for n in shaped_graph(native).nodes if n.domain == DOMAIN]
    rows = emit_auto.time_layers(native, batch=3, threads=1, budget_s=0.01)
    assert [r["layer"] for r in rows] == [n.name for n in nodes] and len(rows) >= 4
    for r in rows:
        assert r["rounds"] >= emit_auto.MIN_ROUNDS and r["batch"] == 3
        assert r["native_quartiles_s"][0] <= r["native_s"] <= r["native_quartiles_s"][1]
        assert r["faster"] == ("native" if r["native_s"] < r["dense_s"] else "dense")
    x = np.random.default_rng(0).standard_normal([3, *nodes[0].inputs[0].shape[1:]]).astype(np.float32)
    alone = emit_auto._alone(nodes[0], native, 3)
    got = session(alone, native=True).run(None, {"x": x})[0]
    want = session(to_portable(alone)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_kernels
@pytest.mark.parametrize("native_layers", [0, 1, "all"])
def test_the_model_holds_exactly_the_nodes_that_ran_faster(monkeypatch, portable, native_layers):
    real = emit_auto.time_layers

    def decided(native, batch, threads, **kw):  # the real rows, with the choice forced
        rows = real(native, batch, threads, budget_s=0.001)
        for k, r in enumerate(rows):
            r["faster"] = "native" if native_layers == "all" or k < native_layers else "dense"
        return rows

    monkeypatch.setattr(emit_auto, "time_layers", decided)
    monkeypatch.setattr(emit_auto, "time_model", _whole_model_faster)
    result = merge(PAIR, method="codebook", params={**PARAMS, "emit": "auto", "target_batch": 2}, progress=False)
    rows = result.info.fidelity["emit_auto"]
    faster = {r["layer"] for r in rows if r["faster"] == "native"}
    assert all(r["kept"] == r["faster"] for r in rows)
    got = {n.name for n in result.model.graph.node if n.domain == DOMAIN}
    assert got == faster and all(r["batch"] == 2 for r in rows)
    assert result.info.params["emit"] == ("gather" if not faster else "auto")
    if faster:  # the native model computes the portable one's numbers
        assert result.info.fidelity["native_vs_portable_rel_diff"] <= 1e-4
    notes = result.info.fidelity.get("notes", [])
    assert sum("timed slower than dense here" in n for n in notes) == (len(rows) - len(faster) if faster else 0)
    assert any(n.startswith("--emit auto: no native node ran faster") for n in notes) == (not faster)


@needs_kernels
def test_integer_tables_are_timed_as_float_tables_too_and_kept_so_where_that_is_fastest(monkeypatch):
    """--table-precision int8: each node with integer tables is also timed with float tables (the same
    node without table_bits, computing the portable form's numbers); a layer whose fastest form that is
    keeps float tables, the others their int8 ones."""
    params = {**PARAMS, "emit": "auto", "table_precision": "int8"}
    native, _ = to_native(merge(PAIR, method="codebook", params=PARAMS, progress=False).model, table_bits=8)
    rows = emit_auto.time_layers(native, batch=2, threads=1, budget_s=0.01)
    integer = {n.name for n in native.graph.node if any(a.name == "table_bits" for a in n.attribute)}
    assert integer and {r["layer"] for r in rows if "fp32_tables_s" in r} == integer
    for r in rows:
        forms = {"native": r["native_s"], "dense": r["dense_s"], emit_auto.FLOAT_TABLES: r.get("fp32_tables_s", np.inf)}
        assert r["faster"] == min(forms, key=forms.get)
    node = next(n for n in shaped_graph(native).nodes if n.name in integer)
    x = np.random.default_rng(1).standard_normal([2, *node.inputs[0].shape[1:]]).astype(np.float32)
    alone, floats = emit_auto._alone(node, native, 2), emit_auto._alone(node, native, 2, float_tables=True)
    want = session(to_portable(alone)).run(None, {"x": x})[0]
    got = session(floats, native=True).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(session(alone, native=True).run(None, {"x": x})[0] - want).max() > 1e-4 * np.abs(want).max()

    real = emit_auto.time_layers

    def decided(native, batch, threads, **kw):  # the real rows; float tables fastest for the first integer node
        rows = real(native, batch, threads, budget_s=0.001)
        first = next(r["layer"] for r in rows if "fp32_tables_s" in r)
        for r in rows:
            r["faster"] = emit_auto.FLOAT_TABLES if r["layer"] == first else "native"
        return rows

    monkeypatch.setattr(emit_auto, "time_layers", decided)
    monkeypatch.setattr(emit_auto, "time_model", _whole_model_faster)
    result = merge(PAIR, method="codebook", params=params, progress=False)
    rows = result.info.fidelity["emit_auto"]
    first = next(r["layer"] for r in rows if r["faster"] == emit_auto.FLOAT_TABLES)
    bits = {n.name: [a.i for a in n.attribute if a.name == "table_bits"] for n in result.model.graph.node
            if n.domain == DOMAIN}
    assert bits.pop(first) == [] and bits and all(b == [8] for name, b in bits.items() if name in integer)


def _whole_model_faster(model, portable, batch, threads, **kw):
    return {"native_layers": sum(n.domain == DOMAIN for n in model.graph.node), "batch": batch, "threads": threads,
            "ratio": 1.5, "ratio_q1": 1.4, "ratio_q3": 1.6}


@needs_kernels
def test_while_the_whole_model_is_slower_the_layer_that_saved_least_time_returns_to_dense(monkeypatch, portable):
    """Every layer timed faster alone, by 2.0x, 1.9x, ...; the whole model slower than the portable form
    twice (once faster on the median only), then faster beyond noise: the two layers that saved least go back to dense, one per check,
    and the report says why."""
    real = emit_auto.time_layers

    def decided(native, batch, threads, **kw):
        rows = real(native, batch, threads, budget_s=0.001)
        for k, r in enumerate(rows):
            r["dense_s"], r["native_s"], r["faster"] = 1.0, 1.0 / (2.0 - 0.1 * k), "native"
        return rows

    checks = []

    def whole(model, portable, batch, threads, **kw):
        row = _whole_model_faster(model, portable, batch, threads)
        # faster on the median but not in three of four rounds, slower, then faster beyond noise
        row["ratio"], row["ratio_q1"] = [(1.05, 0.95), (0.9, 0.85), (1.2, 1.1)][len(checks)]
        checks.append(row["native_layers"])
        return row

    monkeypatch.setattr(emit_auto, "time_layers", decided)
    monkeypatch.setattr(emit_auto, "time_model", whole)
    result = merge(PAIR, method="codebook", params={**PARAMS, "emit": "auto"}, progress=False)
    rows = result.info.fidelity["emit_auto"]
    n = len(rows)
    assert checks == [n, n - 1, n - 2] and [w["native_layers"] for w in result.info.fidelity["emit_auto_model"]] == checks
    assert [r["kept"] for r in rows] == ["native"] * (n - 2) + ["dense (model slower)"] * 2
    assert {nd.name for nd in result.model.graph.node if nd.domain == DOMAIN} == {r["layer"] for r in rows[:n - 2]}
    notes = result.info.fidelity["notes"]
    assert sorted(x.split(" ran ")[1][:5] for x in notes if "faster alone, but the model with its" in x) == ["0.90x", "1.05x"]


def test_without_kernels_auto_writes_the_portable_form(monkeypatch, portable):
    monkeypatch.setattr(kernels, "available", lambda: False)
    result = merge(PAIR, method="codebook", params={**PARAMS, "emit": "auto"}, progress=False)
    assert not any(n.domain == DOMAIN for n in result.model.graph.node)
    assert any(n.startswith("--emit auto:") and "portable form" in n for n in result.info.fidelity["notes"])
    assert "emit_auto" not in result.info.fidelity


@needs_kernels
def test_the_report_lists_the_timings_and_the_choice_per_layer(tmp_path, capsys):
    from onnxmerge.cli import main

    argv = [*map(str, PAIR), "-o", str(tmp_path / "m.onnx"), "--method", "codebook", "--preset", "light",
            "--emit", "auto", "--target-batch", "2", "--table-precision", "int8", "--no-latency"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    head = next(line for line in out.splitlines() if line.startswith("--emit auto: each native node"))
    assert "batch 2, 1 thread(s)" in head
    # integer tables: each node timed in three forms
    assert any(line.split()[2:6] == ["native", "us", "fp32", "tables"] for line in out.splitlines() if line.strip())
    rows = [line for line in out.splitlines() if line.strip().startswith(("fashion_lenet/", "digits_lenet/"))
            and line.rstrip().endswith((" native", " dense", " dense (model slower)", emit_auto.FLOAT_TABLES))]
    assert len(rows) >= 4
    # the whole model is timed while any layer is native alone
    wholes = [line for line in out.splitlines() if line.startswith("- --emit auto: the whole model with ")]
    assert bool(wholes) == any(line.rstrip().endswith((" native", "(model slower)")) for line in rows)


@needs_kernels
def test_with_no_timed_layer_left_every_native_node_returns_and_the_portable_form_is_written(monkeypatch):
    """The first node has no timing row (as a node whose input size is unknown); the whole model is
    always slower: each timed layer returns to dense in turn, then the untimed one, and auto writes
    the portable form, saying why."""
    real = emit_auto.time_layers
    monkeypatch.setattr(emit_auto, "time_layers", lambda native, b, t, **kw: real(native, b, t, budget_s=0.001)[1:])

    def slower(model, portable, batch, threads, **kw):
        return {**_whole_model_faster(model, portable, batch, threads), "ratio": 0.8, "ratio_q1": 0.7, "ratio_q3": 0.9}

    monkeypatch.setattr(emit_auto, "time_model", slower)
    result = merge(PAIR, method="codebook", params={**PARAMS, "emit": "auto"}, progress=False)
    assert not any(n.domain == DOMAIN for n in result.model.graph.node) and result.info.params["emit"] == "gather"
    rows, checks = result.info.fidelity["emit_auto"], result.info.fidelity["emit_auto_model"]
    timed_native = [r for r in rows if r["faster"] == "native"]
    assert [w["native_layers"] for w in checks][-1] == 1  # the untimed node, alone, last
    assert all(r["kept"] == "dense (model slower)" for r in timed_native)
    assert any(n.startswith("--emit auto: no native node ran faster") for n in result.info.fidelity["notes"])


@needs_kernels
def test_a_merge_at_a_fixed_batch_is_timed_whole_at_that_batch(tmp_path):
    """A model whose batch dim could not be made symbolic runs at its fixed batch (2) only: the
    whole-model check runs it there, whatever --target-batch says."""
    from model.test_upgrade import fixed_files

    fixed = merge(fixed_files(tmp_path, 2), method="pack", progress=False).model
    row = emit_auto.time_model(fixed, fixed, batch=1, threads=1, budget_s=0.01)
    assert row["batch"] == 2 and row["native_layers"] == 0 and row["ratio"] > 0
