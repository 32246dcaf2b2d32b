"""The native ai.onnxmerge kernels (kernels/lookup_impl.cc, pack.cc, custom_op.cc) in onnxruntime
against the numpy oracle (onnxmerge.graph.ops), on every instruction set this CPU runs, at one and
several threads, with constant (packed once) and non-constant codebooks and codes; and a real merged
model's native form against its portable form.

Skipped, with the loader's reason, when the library is not built (python kernels/build.py)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, isa_params
from onnxmerge import kernels
from onnxmerge.graph.ops import is_native, to_portable
from random_layers import TOL, econv_config, efc_config, random_layer, reference, rel

ORDER_VARIABLE, ORDERS = kernels.ORDER_VARIABLE, ("channels", "rows")

pytestmark = pytest.mark.skipif(not kernels.available(), reason=kernels.unavailable_reason() or "built")



def native_session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    options = kernels.register(ort.SessionOptions())
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def one_node(op: str, x_rank: int, codebook, codes, bias, constant: bool = True, **attrs) -> onnx.ModelProto:
    """A one-node model; codebook and codes are initializers, or graph inputs if not `constant`."""
    tensors = [numpy_helper.from_array(codebook, "codebook"), numpy_helper.from_array(codes, "codes")]
    names = ["X", "codebook", "codes"]
    if bias is not None:
        tensors.append(numpy_helper.from_array(bias, "B"))
        names.append("B")
    node = helper.make_node(op, names, ["Y"], domain="ai.onnxmerge", **attrs)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * x_rank)]
    if not constant:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors[:2]]
        tensors = tensors[2:]
    graph = helper.make_graph([node], "g", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * x_rank)], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnxmerge", 1)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("seed", range(30))
def test_econv_matches_the_numpy_reference(seed):
    x, codebook, codes, bias, attrs = econv_config(seed)
    model = one_node("EConv", 4, codebook, codes, bias, **attrs)
    got = native_session(model).run(None, {"X": x})[0]
    assert rel(got, reference("EConv", x, codebook, codes, bias, attrs)) <= TOL, attrs


@pytest.mark.parametrize("seed", range(30))
def test_efc_matches_the_numpy_reference(seed):
    x, codebook, codes, bias, attrs = efc_config(seed)
    model = one_node("EFC", 2, codebook, codes, bias, **attrs)
    got = native_session(model).run(None, {"X": x})[0]
    assert rel(got, reference("EFC", x, codebook, codes, bias, attrs)) <= TOL


def test_the_configurations_cover_both_code_types_and_optional_inputs():
    configs = [econv_config(s) for s in range(30)] + [efc_config(s) for s in range(30)]
    assert {c[2].dtype for c in configs} == {np.dtype(np.uint8), np.dtype(np.uint16)}
    assert any(c[3] is None for c in configs) and any(c[3] is not None for c in configs)
    assert any(c[1].shape[0] > c[2].shape[0] for c in configs)  # V' > V
    assert any(max(c[4].get("strides", [1])) == 2 and max(c[4].get("pads", [0])) > 0 for c in configs)
    assert any(max(c[4].get("dilations", [1])) == 2 for c in configs)


def test_bad_inputs_are_reported_not_read_out_of_bounds():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal((2, 4, 3)).astype(np.float32)
    codes = np.full((2, 5), 4, np.uint8)  # index 4 of a 4-codeword codebook
    x = np.ones((1, 6), np.float32)
    # constant codes are checked once, when the session creates the kernel
    with pytest.raises(Exception, match="out of range"):
        native_session(one_node("EFC", 2, codebook, codes, None, in_features=6))
    # codes fed at run time are checked on every run
    sess = native_session(one_node("EFC", 2, codebook, codes, None, constant=False, in_features=6))
    with pytest.raises(Exception, match="out of range"):
        sess.run(None, {"X": x, "codebook": codebook, "codes": codes})
    assert sess.run(None, {"X": x, "codebook": codebook, "codes": codes.clip(0, 3)})[0].shape == (1, 5)
    sess = native_session(one_node("EFC", 2, codebook, codes.clip(0, 3), None, in_features=6))
    with pytest.raises(Exception, match="in_features"):
        sess.run(None, {"X": np.ones((1, 5), np.float32)})
    bad_type = one_node("EFC", 2, codebook, codes.clip(0, 3).astype(np.int32), None, in_features=6)
    with pytest.raises(Exception, match="uint8 or uint16"):
        native_session(bad_type).run(None, {"X": x})
    conv = one_node("EConv", 4, codebook, np.zeros((2, 3, 5, 5), np.uint8), None, in_channels=6, kernel_shape=[5, 5])
    with pytest.raises(Exception, match="does not fit"):
        native_session(conv).run(None, {"X": np.ones((1, 6, 3, 3), np.float32)})


# --------------------------------------------------------------------------------------------
# instruction sets, threads, non-constant inputs, and shapes that exercise the tiling

def large_configs():
    """Layers big enough for every code path: EConv whose tables need several row tiles and segment
    groups (kernels/pack.cc), outputs wider than two vectors, both strides, stride 1 flat and in rows
    (32 outputs wide: EConvPlan::flat); EFC at batch 1 (register tables on AVX-512 for C <= 64,
    scalar otherwise), 5 and 40 (one and several sample tiles)."""
    rng = np.random.default_rng(7)
    out = []
    for d, p, hw, k, stride, n_codes, n in [(24, 12, 40, 3, 1, 256, 2), (16, 5, 37, 5, 2, 64, 1), (9, 7, 21, 3, 1, 300, 3),
                                                 (8, 6, 32, 3, 1, 64, 2)]:
        codebook, codes = random_layer(rng, d, (p, k, k))
        codebook = rng.standard_normal((codebook.shape[0], n_codes, codebook.shape[2])).astype(np.float32)
        codes = rng.integers(0, n_codes, codes.shape).astype(np.uint16 if n_codes > 256 else np.uint8)
        x = rng.standard_normal((n, d, hw, hw)).astype(np.float32)
        out.append(("EConv", x, codebook, codes, rng.standard_normal(p).astype(np.float32),
                    dict(in_channels=d, kernel_shape=[k, k], strides=[stride, stride], pads=[1, 2, 1, 0],
                         dilations=[1, 1])))
    for n, n_codes, d, n_out in [(1, 64, 300, 70), (1, 20, 50, 33), (1, 200, 90, 40), (5, 64, 130, 21), (40, 48, 77, 100)]:
        r = int(rng.integers(1, 9))
        n_seg = -(-d // r)
        codebook = rng.standard_normal((n_seg, n_codes, r)).astype(np.float32)
        codes = rng.integers(0, n_codes, (n_seg, n_out)).astype(np.uint8)
        x = rng.standard_normal((n, d)).astype(np.float32)
        out.append(("EFC", x, codebook, codes, rng.standard_normal(n_out).astype(np.float32), dict(in_features=d)))
    return out


# the EConv / EFC layers of tools/bench/kernels.py (the paper LeNet pair merged at accu and light):
# (op, input shape per sample, output channels, kernel, pads, r, C)
BENCH_LAYERS = [("EConv", (32, 16, 16), 64, 5, 2, 4, 128), ("EConv", (32, 16, 16), 64, 5, 2, 8, 64),
                ("EFC", (4096,), 1024, 1, 0, 4, 64), ("EFC", (4096,), 1024, 1, 0, 8, 64)]


@pytest.mark.parametrize("layer", BENCH_LAYERS, ids=lambda l: f"{l[0]}-r{l[5]}-C{l[6]}")
@pytest.mark.parametrize("batch", [1, 32])
def test_the_benchmark_layer_shapes_match_the_reference(layer, batch):
    op, x_shape, p, k, pad, r, n_codes = layer
    rng = np.random.default_rng(sum(x_shape) + r + batch)
    n_seg = -(-x_shape[0] // r)
    codebook = rng.standard_normal((n_seg, n_codes, r)).astype(np.float32)
    codes = rng.integers(0, n_codes, (n_seg, p, k, k) if op == "EConv" else (n_seg, p)).astype(np.uint8)
    bias = rng.standard_normal(p).astype(np.float32)
    x = rng.standard_normal((batch, *x_shape)).astype(np.float32)
    attrs = (dict(in_channels=x_shape[0], kernel_shape=[k, k], strides=[1, 1], pads=[pad] * 4, dilations=[1, 1])
             if op == "EConv" else dict(in_features=x_shape[0]))
    got = native_session(one_node(op, x.ndim, codebook, codes, bias, **attrs)).run(None, {"X": x})[0]
    assert rel(got, reference(op, x, codebook, codes, bias, attrs)) <= TOL


def test_the_library_reports_its_instruction_sets():
    isas = kernels.isas()
    assert isas and isas[-1] == "generic" and set(isas) <= {"avx512", "avx2", "generic"}
    assert kernels.isa() == isas[0]


def _sysfs_caches() -> tuple[int, int] | None:
    """cpu0's L1 data and L2 cache sizes read from sysfs here, independently of the library."""
    found = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((index / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        n = int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0)
        if (level, kind) == ("1", "Data") or (level == "2" and kind != "Instruction"):
            found[level] = n
    return (found["1"], found["2"]) if len(found) == 2 else None


def test_the_library_sizes_its_tables_by_this_cpu_s_caches():
    got = kernels.cache_sizes()
    forced = os.environ.get("ONNXMERGE_L1D_BYTES"), os.environ.get("ONNXMERGE_L2_BYTES")
    if all(forced):
        assert got["source"] == "environment" and (got["l1d_bytes"], got["l2_bytes"]) == tuple(map(int, forced))
    elif _sysfs_caches():
        assert got["source"] == "sysfs" and (got["l1d_bytes"], got["l2_bytes"]) == _sysfs_caches()
    else:
        assert got["source"] in ("sysconf", "defaults") and got["l1d_bytes"] > 0 and got["l2_bytes"] > 0


@pytest.mark.parametrize("order", ORDERS)
def test_small_caches_give_other_blocks_and_the_same_numbers(order):
    """The block sizes follow the caches: with a 4 KiB L1d and a 64 KiB L2 (forced), tables are built
    in many small blocks (several tiles and segment groups; with the lookups in channel order, one
    segment at a time for every channel), and every instruction set still matches the reference."""
    env = {**os.environ, "ONNXMERGE_L1D_BYTES": "4096", "ONNXMERGE_L2_BYTES": "65536", ORDER_VARIABLE: order}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "every_instruction_set or sizes_its_tables or benchmark_layer_shapes", "-rs"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    assert " passed" in done.stdout and all("this CPU does not run" in line for line in skips), done.stdout[-2000:]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("isa", isa_params())
def test_every_instruction_set_matches_the_reference(isa, order, monkeypatch):
    """Each instruction set, with float tables' lookups in either order (EConvPlan::channels: forced
    here, chosen by the cache sizes otherwise)."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, isa)
    monkeypatch.setenv(ORDER_VARIABLE, order)
    cases = large_configs() + [("EConv", *econv_config(s)) for s in range(8)] + [("EFC", *efc_config(s)) for s in range(8)]
    for op, x, codebook, codes, bias, attrs in cases:
        got = native_session(one_node(op, x.ndim, codebook, codes, bias, **attrs)).run(None, {"X": x})[0]
        assert rel(got, reference(op, x, codebook, codes, bias, attrs)) <= TOL, (isa, op, x.shape, attrs)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("isa", isa_params())
def test_integer_tables_match_their_reference_on_every_instruction_set(isa, bits, monkeypatch):
    """`table_bits` 16 / 8: the same quantised arithmetic as the numpy reference, rounded as `isa`
    computes its tables (fused multiply-adds or not): equal to TOL (int16 tables in practice bit for
    bit; int8 ones differ by the order of the float additions: runs of segments join them at once)."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, isa)
    cases = [("EConv", econv_config(seed, bits)) for seed in range(30)] + [("EFC", efc_config(seed, bits)) for seed in range(30)]
    for op, (x, codebook, codes, bias, attrs) in cases:
        got = native_session(one_node(op, x.ndim, codebook, codes, bias, **attrs)).run(None, {"X": x})[0]
        assert rel(got, reference(op, x, codebook, codes, bias, attrs, isa)) <= TOL, (isa, op, x.shape, codebook.shape, attrs)


@pytest.mark.parametrize("k", [15, 19])
@pytest.mark.parametrize("isa", isa_params())
def test_int8_sums_that_would_leave_int16_are_exact(isa, k, monkeypatch):
    """int8 entries are summed per segment in 16 bits on x86 while kh * kw * 127 fits (15x15 = 225
    offsets), in 32 bits beyond (19x19 = 361): positive inputs and one positive codeword picked
    everywhere put every entry near +127, so a 19x19 segment's sum passes 32,767 and 16-bit sums
    would wrap."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, isa)
    rng = np.random.default_rng(k)
    d, p, r, n_codes = 4, 3, 4, 8
    codebook = rng.standard_normal((1, n_codes, r)).astype(np.float32)
    codebook[0, 5] = np.abs(codebook[0, 5]) + 1.0
    codes = np.full((1, p, k, k), 5, np.uint8)
    x = rng.uniform(0.9, 1.0, (1, d, k + 6, k + 40)).astype(np.float32)  # rows of two vectors and more
    attrs = dict(in_channels=d, kernel_shape=[k, k], strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], table_bits=8)
    got = native_session(one_node("EConv", x.ndim, codebook, codes, None, **attrs)).run(None, {"X": x})[0]
    want = reference("EConv", x, codebook, codes, None, attrs, isa)
    assert rel(got, want) <= TOL, (isa, k)


@pytest.mark.parametrize("op, k", [("EConv", 1), ("EConv", 3), ("EFC", 1)])
@pytest.mark.parametrize("isa", isa_params())
def test_int8_runs_of_segments_of_other_scales_stay_exact(isa, op, k, monkeypatch):
    """int8 sums go on in 16 bits over a run of segments, each shifted to the run's least scale
    (kernels/lookup_impl.cc segment_runs; EConv's lookups and EFC's shuffles, 32 outputs at once):
    segments whose inputs are 1 to 2^7 times as large (shifts of 0 to 7), one all zero (scale 0), and
    one positive codeword picked everywhere, so that every entry is near +127 and a run kept past its
    bound (taps * 127 * 2^shift summed within 32,767) would wrap."""
    monkeypatch.setenv(kernels.ISA_VARIABLE, isa)
    rng = np.random.default_rng(k)
    d, p, r, n_codes = 96, 5 if op == "EConv" else 40, 4, 8
    n_seg = d // r
    codebook = rng.standard_normal((n_seg, n_codes, r)).astype(np.float32)
    codebook[:, 5] = np.abs(codebook[:, 5]) + 1.0
    magnitude = np.repeat(2.0 ** np.array([(v * 3) % 8 for v in range(n_seg)], np.float32), r)
    magnitude[7 * r:8 * r] = 0.0
    if op == "EConv":
        codes = np.full((n_seg, p, k, k), 5, np.uint8)
        x = rng.uniform(0.9, 1.0, (2, d, 20, 37)).astype(np.float32) * magnitude[None, :, None, None]
        attrs = dict(in_channels=d, kernel_shape=[k, k], strides=[1, 1], pads=[k // 2] * 4, dilations=[1, 1],
                     table_bits=8)
    else:
        codes = np.full((n_seg, p), 5, np.uint8)
        x = rng.uniform(0.9, 1.0, (2, d)).astype(np.float32) * magnitude
        attrs = dict(in_features=d, table_bits=8)
    got = native_session(one_node(op, x.ndim, codebook, codes, None, **attrs)).run(None, {"X": x})[0]
    want = reference(op, x, codebook, codes, None, attrs, isa)
    assert rel(got, want) <= TOL, (isa, op, k)


def test_integer_tables_turn_a_nan_input_into_nan_outputs_as_the_reference_does():
    """A sample with a NaN (or infinite) input has no finite scale: its outputs are NaN, in the
    kernels as in the reference (std::max would drop the NaN and round garbage instead)."""
    for (op, (sample, codebook, codes, bias, attrs)), bad in itertools.product(
            [("EConv", econv_config(3, 8)), ("EFC", efc_config(3, 8))], (np.nan, np.inf)):
        x = np.concatenate([sample[:1], sample[:1]])  # the second sample stays finite
        x[(0,) * x.ndim] = bad
        got = native_session(one_node(op, x.ndim, codebook, codes, bias, **attrs)).run(None, {"X": x})[0]
        want = reference(op, x, codebook, codes, bias, attrs, kernels.isa())
        assert np.isnan(want[0]).all() and not np.isnan(want[1:]).any()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        assert rel(got[1:], want[1:]) <= TOL


@pytest.mark.parametrize("op, config", [("EConv", econv_config), ("EFC", efc_config)])
def test_an_unknown_table_precision_is_refused(op, config):
    x, codebook, codes, bias, attrs = config(0)
    with pytest.raises(Exception, match=f"{op}: table_bits must be 32, 16 or 8, not 4"):
        native_session(one_node(op, x.ndim, codebook, codes, bias, table_bits=4, **attrs)).run(None, {"X": x})


def test_an_unknown_lookup_order_is_refused(monkeypatch):
    x, codebook, codes, bias, attrs = econv_config(0)
    monkeypatch.setenv(ORDER_VARIABLE, "columns")
    with pytest.raises(Exception, match=f"{ORDER_VARIABLE} must be channels or rows, not 'columns'"):
        native_session(one_node("EConv", x.ndim, codebook, codes, bias, **attrs)).run(None, {"X": x})


def test_an_unknown_instruction_set_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ISA_VARIABLE, "avx9000")
    op, x, codebook, codes, bias, attrs = large_configs()[-1]
    with pytest.raises(Exception, match="unknown instruction set 'avx9000'"):
        native_session(one_node(op, x.ndim, codebook, codes, bias, **attrs))


def test_threads_and_non_constant_inputs_give_the_same_numbers():
    """Each output is summed by one work item in a fixed order, so several threads give the single
    thread's result bit for bit (at batch > 1 each sample on one thread: one parallel section; integer
    tables too); codebooks and codes fed at run time give the packed result."""
    integer = [(op, *rest, attrs | {"table_bits": 8}) for op, *rest, attrs in large_configs()]
    for op, x, codebook, codes, bias, attrs in large_configs() + integer:
        one = native_session(one_node(op, x.ndim, codebook, codes, bias, **attrs)).run(None, {"X": x})[0]
        two = native_session(one_node(op, x.ndim, codebook, codes, bias, **attrs), threads=2).run(None, {"X": x})[0]
        fed = native_session(one_node(op, x.ndim, codebook, codes, bias, constant=False, **attrs)).run(
            None, {"X": x, "codebook": codebook, "codes": codes})[0]
        np.testing.assert_array_equal(two, one)
        np.testing.assert_array_equal(fed, one)


def test_merged_lenets_native_kernels_equal_the_portable_form():
    from onnxmerge.api import merge
    from onnxmerge.data import load_dataset

    names = ("fashion_lenet", "digits_lenet")
    result = merge([EXAMPLES / f"{n}.onnx" for n in names], method="codebook", params={"emit": "native"})
    native = result.model
    assert is_native(native)
    ops = sorted({n.op_type for n in native.graph.node if n.domain == "ai.onnxmerge"})
    assert ops == ["EConv", "EFC"]
    portable = to_portable(native)
    assert not is_native(portable)
    data = {n: load_dataset(EXAMPLES / f"{n.split('_')[0]}_eval.npz").x for n in names}
    batch = min(len(x) for x in data.values())  # the tasks' inputs share the batch dimension
    data = {n: x[:batch] for n, x in data.items()}
    feeds = {t.inputs["input"]: data[t.name] for t in result.info.tasks}
    outs = [o.name for o in native.graph.output]
    got = dict(zip(outs, native_session(native).run(outs, feeds)))
    want = dict(zip(outs, ort.InferenceSession(portable.SerializeToString(),
                                               providers=["CPUExecutionProvider"]).run(outs, feeds)))
    for t in result.info.tasks:
        name = t.outputs["logits"]
        assert got[name].shape == (len(data[t.name]), 10)
        assert rel(got[name], want[name]) <= TOL, name
        assert (got[name].argmax(1) == want[name].argmax(1)).mean() >= 0.99


def test_evaluation_of_a_native_model_runs_the_kernels_and_matches_the_portable_form(monkeypatch):
    from onnxmerge.api import merge
    from onnxmerge.data import load_dataset
    from onnxmerge.graph import ops as lookup_ops
    from onnxmerge.graph.ops import make_session
    from onnxmerge.measure.evaluate import evaluate

    result = merge([EXAMPLES / "fashion_lenet.onnx", EXAMPLES / "digits_lenet.onnx"], method="codebook",
                   params={"emit": "native"})
    portable_model = to_portable(result.model)

    def refuse(model):
        raise AssertionError("the native model was rewritten to its portable form")

    monkeypatch.setattr(lookup_ops, "to_portable", refuse)  # with the kernels built, sessions run EConv / EFC
    make_session(result.model, threads=1)
    data = {"fashion_lenet": load_dataset(EXAMPLES / "fashion_eval.npz"),
            "digits_lenet": load_dataset(EXAMPLES / "digits_eval.npz")}
    native = evaluate(result.model, result.info, data, progress=False)
    portable = evaluate(portable_model, result.info, data, progress=False)
    for name in data:
        assert native[name]["accuracy"] == portable[name]["accuracy"]
