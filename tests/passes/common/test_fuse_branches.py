"""Fusing the tasks' parallel layers (passes/common/fuse_branches.py): the fused model against the model
as it was (built here by hand, run by onnxruntime: the reference), which layers fuse, and the merge's use."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import init, make_model, shipped
from onnxmerge.api import merge
from onnxmerge.errors import UsageError
from onnxmerge.model.runtime import random_feeds, session
from onnxmerge.passes.common import fuse_branches as fuse_module
from onnxmerge.passes.common.fuse_branches import apply, fuse_branches

MODELS = Path(__file__).resolve().parents[2] / "models"


def branches(widths, opset=17, computed=False, middle_output=False, seed=0, kernel=1) -> onnx.ModelProto:
    """input (N,1,8,8) -> a shared 3x3 conv -> per task i (widths[i] channels): 3x3 conv, BN, Clip,
    depthwise 3x3 conv, Relu, `kernel`x`kernel` conv (its weight gathered from a codebook where
    `computed`), Add of the depthwise output (a shortcut), x * Sigmoid(x), MaxPool, Flatten, Gemm to 3
    classes."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["input", "stem_w"], ["stem"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["stem"], ["x"], name="stem_relu")]
    inits = [init("stem_w", rng.standard_normal((4, 1, 3, 3))),
             init("lo", 0.0), init("hi", 6.0)]
    outputs = []
    for i, c in enumerate(widths):
        t = f"t{i}/"
        nodes += [
            helper.make_node("Conv", ["x", t + "w1", t + "b1"], [t + "c1"], name=t + "conv1", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [t + "c1", t + "g", t + "be", t + "m", t + "v"], [t + "n1"],
                             name=t + "bn", epsilon=1e-3),
            helper.make_node("Clip", [t + "n1", "lo", "hi"], [t + "r1"], name=t + "clip"),
            helper.make_node("Conv", [t + "r1", t + "wd"], [t + "d"], name=t + "dw", group=c, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [t + "d"], [t + "dr"], name=t + "dw_relu"),
            helper.make_node("Conv", [t + "dr", t + "wp", t + "bp"], [t + "p"], name=t + "pw",
                             pads=[kernel // 2] * 4),
            helper.make_node("Add", [t + "p", t + "dr"], [t + "sum"], name=t + "shortcut"),
            helper.make_node("Sigmoid", [t + "sum"], [t + "sig"], name=t + "sigmoid"),
            helper.make_node("Mul", [t + "sum", t + "sig"], [t + "silu"], name=t + "silu"),
            helper.make_node("MaxPool", [t + "silu"], [t + "pool"], name=t + "pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", [t + "pool"], [t + "flat"], name=t + "flatten"),
            helper.make_node("Gemm", [t + "flat", t + "wf", t + "bf"], [t + "logits"], name=t + "fc", transB=1),
        ]
        inits += [init(t + "w1", rng.standard_normal((c, 4, 3, 3)) * 0.3), init(t + "b1", rng.standard_normal(c)),
                  init(t + "g", rng.uniform(0.5, 1.5, c)), init(t + "be", rng.standard_normal(c)),
                  init(t + "m", rng.standard_normal(c)), init(t + "v", rng.uniform(0.5, 2, c)),
                  init(t + "wd", rng.standard_normal((c, 1, 3, 3)) * 0.3), init(t + "bp", rng.standard_normal(c)),
                  init(t + "wf", rng.standard_normal((3, c * 16)) * 0.1), init(t + "bf", rng.standard_normal(3))]
        if computed:  # the portable codebook form's shape: a weight gathered from a codebook by codes
            nodes[-12:-12] = [helper.make_node("Gather", [t + "book", t + "codes"], [t + "rows"], name=t + "gather",
                                               axis=0),
                      helper.make_node("Reshape", [t + "rows", t + "shape"], [t + "wp"], name=t + "reshape")]
            inits += [init(t + "book", rng.standard_normal((5, c * kernel * kernel))),
                      helper.make_tensor(t + "codes", TensorProto.INT64, [c], rng.integers(0, 5, c).tolist()),
                      helper.make_tensor(t + "shape", TensorProto.INT64, [4], [c, c, kernel, kernel])]
        else:
            inits.append(init(t + "wp", rng.standard_normal((c, c, kernel, kernel)) * 0.3))
        outputs.append(helper.make_tensor_value_info(t + "logits", TensorProto.FLOAT, ["N", 3]))
    if middle_output:  # a graph output inside a branch: it must come back by its name
        outputs.append(helper.make_tensor_value_info("t0/dr", TensorProto.FLOAT, ["N", widths[0], 8, 8]))
    return make_model(nodes, inits, opset=opset, outputs=outputs)


def outputs_of(model, feeds):
    sess = session(model)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def check_same(fused, model, batch=3):
    feeds = random_feeds(session(model), batch=batch, seed=5)
    want, got = outputs_of(model, feeds), outputs_of(fused, feeds)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def ops(model):
    """The operators that compute (not the Concat that builds a fused weight, which onnxruntime folds)."""
    return [n.op_type for n in model.graph.node if n.op_type != "Concat"]


@pytest.mark.parametrize("tasks", [2, 3])
def test_branches_of_one_shape_fuse_into_one_chain(tasks):
    model = branches([4] * tasks)
    fused, removed = fuse_branches(model)
    check_same(fused, model)
    # every per-task node up to the heads fused: 11 per task, one of each left, and one Split back to
    # the tasks' flattened features, which each task's head (Gemm) reads
    assert removed == 11 * (tasks - 1) - 1
    computing = ops(fused)
    assert computing.count("Conv") == 4 and computing.count("Gemm") == tasks and computing.count("Split") == 1
    conv = {n.name: n for n in fused.graph.node if n.op_type == "Conv"}
    groups = sorted(helper.get_attribute_value(a) for n in conv.values() for a in n.attribute if a.name == "group")
    assert groups == [tasks, 4 * tasks]  # (H2): the 1x1 convs of group 1 each, the depthwise ones of 4


def test_only_depthwise_and_1x1_convolutions_fuse_into_groups_unless_every_kernel_is_asked_for():
    """A 3x3 convolution of group 1 per task stays per task by default (as a grouped one it ran slower
    on one CPU: module docstring); what fuses before it still does, and a Split gives it its task's
    input. With kernels="any" it is one convolution of group 2, and the chain fuses to the heads."""
    model = branches([4, 4], kernel=3)
    fused, removed = fuse_branches(model)
    check_same(fused, model)
    assert ops(fused).count("Conv") == 1 + 2 + 2 and removed == 5 - 1  # conv1, BN, Clip, depthwise, Relu
    wide, removed = fuse_branches(model, kernels="any")
    check_same(wide, model)
    assert ops(wide).count("Conv") == 1 + 3 and removed == 11 - 1
    groups = sorted(helper.get_attribute_value(a) for n in wide.graph.node if n.op_type == "Conv"
                    for a in n.attribute if a.name == "group")
    assert groups == [2, 8]  # (H2): the 3x3 convs of group 1 each, the depthwise ones of 4


def depthwise_first(multipliers, seed=0, opset=17, bn=False) -> onnx.ModelProto:
    """input (N,1,8,8) -> a shared 3x3 conv (4 channels), BatchNorm (where `bn`) and Relu -> per task
    i: a depthwise 3x3 conv
    of multiplier multipliers[i] reading the shared tensor, Relu, a 1x1 conv to 3 channels, global
    average pool, Flatten (zipper's MobileNet merge shares up to a depthwise layer so)."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["input", "stem_w"], ["stem"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["stem"], ["x"], name="stem_relu")]
    inits, outputs = [init("stem_w", rng.standard_normal((4, 1, 3, 3)))], []
    if bn:
        nodes[1:1] = [helper.make_node("BatchNormalization", ["stem", "g", "b", "m", "v"], ["stem_bn"], name="stem_bn")]
        nodes[2].input[0] = "stem_bn"
        inits += [init(n, rng.uniform(0.5, 1.5, 4)) for n in ("g", "b", "m", "v")]
    for i, m in enumerate(multipliers):
        t = f"t{i}/"
        nodes += [helper.make_node("Conv", ["x", t + "wd", t + "bd"], [t + "d"], name=t + "dw", group=4, pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [t + "d"], [t + "dr"], name=t + "dw_relu"),
                  helper.make_node("Conv", [t + "dr", t + "wp"], [t + "p"], name=t + "pw"),
                  helper.make_node("GlobalAveragePool", [t + "p"], [t + "pool"], name=t + "pool"),
                  helper.make_node("Flatten", [t + "pool"], [t + "logits"], name=t + "flatten")]
        inits += [init(t + "wd", rng.standard_normal((4 * m, 1, 3, 3))), init(t + "bd", rng.standard_normal(4 * m)),
                  init(t + "wp", rng.standard_normal((3, 4 * m, 1, 1)))]
        outputs.append(helper.make_tensor_value_info(t + "logits", TensorProto.FLOAT, ["N", 3]))
    return make_model(nodes, inits, opset=opset, outputs=outputs)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_convolutions_reading_one_tensor_fuse_on_its_channels_repeated(multiplier):
    """(H1'): one depthwise conv of group 2 x 4 reads the shared tensor's channels once per task (a
    Concat), and the chain after it fuses as after H1."""
    model = depthwise_first([multiplier, multiplier])
    fused, removed = fuse_branches(model)
    check_same(fused, model)
    assert ops(fused) == ["Conv", "Relu", "Conv", "Relu", "Conv", "GlobalAveragePool", "Flatten", "Split"]
    assert removed == 5 - 1  # dw, Relu, pw, pool, Flatten of task 1; one Split (the Concat: not counted)
    concat = next(n for n in fused.graph.node if n.op_type == "Concat" and "x" in n.input)
    assert list(concat.input) == ["x", "x"]
    dw = next(n for n in fused.graph.node if n.op_type == "Conv" and n.input[0] == concat.output[0])
    assert {a.name: helper.get_attribute_value(a) for a in dw.attribute}["group"] == 8


@pytest.mark.parametrize("multiplier,bn", [(1, False), (2, False), (1, True)])
def test_depthwise_convolutions_can_read_the_shared_tensor_computed_once_per_task(multiplier, bn):
    """(H1''): named in `dense`, the depthwise convs read the shared conv (its BatchNorm) and its Relu
    computed with their weights repeated (one conv of 2 x 4 channels), not a Concat; the shared conv
    as it was goes."""
    model = depthwise_first([multiplier, multiplier], bn=bn)
    fused, removed = fuse_branches(model, dense=frozenset({"t0/dw"}))
    check_same(fused, model)
    assert ops(fused) == ["Conv", *["BatchNormalization"] * bn, "Relu", "Conv", "Relu", "Conv", "GlobalAveragePool",
                          "Flatten", "Split"]
    assert removed == 5 - 1 and not any(n.op_type == "Concat" and "x" in n.input for n in fused.graph.node)
    stem = next(n for n in fused.graph.node if n.op_type == "Conv" and n.input[0] == "input")
    assert stem.name == "t0/dw_producer" and [c for n in fused.graph.node if n.output[0] == stem.input[1]
                                             for c in n.input] == ["stem_w", "stem_w"]


def test_auto_tries_the_shared_tensor_computed_per_task_and_the_report_says_so(monkeypatch):
    from onnxmerge.measure.report import _fuse_branches_line

    monkeypatch.setattr(fuse_module, "time_models", lambda models, baseline, *a, **k: {
        form: {"ratio": 1.2, "ratio_q1": 1.1, "ratio_q3": 1.3} for form in models})
    model = depthwise_first([1, 1])
    kept, record = apply(model, "auto")
    assert [(t["dense"], t["rewrite"]) for t in record["timed"]] == [(None, None), ("t0/pw", "H6"), ("t0/dw", "H1''")]
    assert record["dense"] == ["t0/pw", "t0/dw"] and "Concat" not in [n.op_type for n in kept.graph.node
                                                                       if "x" in n.input]
    check_same(kept, model)
    assert "t0/dw on its input computed once per task (2,304 multiplications more) ran 1.20x" in _fuse_branches_line(record)


def test_a_shared_tensor_read_by_more_than_the_depthwise_convolutions_is_not_computed_twice():
    model = depthwise_first([1, 1])
    extra = helper.make_node("GlobalAveragePool", ["x"], ["x_pool"], name="x_pool")
    model.graph.node.append(extra)
    model.graph.output.append(helper.make_tensor_value_info("x_pool", TensorProto.FLOAT, ["N", 4, 1, 1]))
    eligible = {}
    fuse_branches(model, eligible=eligible)
    assert "t0/dw" not in eligible and "t0/pw" in eligible


def test_depthwise_convolutions_of_other_multipliers_stay_per_task():
    model = depthwise_first([1, 2])
    fused, removed = fuse_branches(model)
    assert removed == 0 and fused is model


def test_a_region_that_saves_no_node_at_run_time_is_left_as_it_was(monkeypatch):
    """Per task a conv and its Relu (which onnxruntime fuses into the conv anyway), then a 3x3 conv
    that stays per task: fusing would save one node and cost a Split."""
    rng = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for t in ("a/", "b/"):
        nodes += [helper.make_node("Conv", ["input", t + "w1"], [t + "c1"], name=t + "conv1", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [t + "c1"], [t + "r1"], name=t + "relu"),
                  helper.make_node("Conv", [t + "r1", t + "w2"], [t + "c2"], name=t + "conv2", pads=[1, 1, 1, 1]),
                  helper.make_node("GlobalAveragePool", [t + "c2"], [t + "pool"], name=t + "pool"),
                  helper.make_node("Flatten", [t + "pool"], [t + "logits"], name=t + "flatten")]
        inits += [init(t + "w1", rng.standard_normal((3, 1, 3, 3))), init(t + "w2", rng.standard_normal((3, 3, 3, 3)))]
        outputs.append(helper.make_tensor_value_info(t + "logits", TensorProto.FLOAT, ["N", 3]))
    model = make_model(nodes, inits, outputs=outputs)
    passes = []
    real = fuse_module.fuse_branches

    def count(*args, **kwargs):
        passes.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fuse_module, "fuse_branches", count)
    assert fuse_module.fuse_branches(model) == (model, 0)
    assert len(passes) == 2  # the second pass skips every H1 node of the idle region at once
    assert apply(model, "on") == (model, None)


def test_the_tasks_weights_stay_under_their_names():
    model = branches([4, 4])
    fused, _ = fuse_branches(model)
    before = {i.name: i for i in model.graph.initializer}
    after = {i.name: i for i in fused.graph.initializer}
    for name in ("t0/w1", "t1/w1", "t0/wp", "t1/wf", "t1/g"):
        assert after[name] == before[name]


def test_layers_of_other_widths_stay_per_task_and_the_outputs_agree():
    model = branches([4, 6])
    fused, removed = fuse_branches(model)
    check_same(fused, model)
    convs = [n for n in fused.graph.node if n.op_type == "Conv"]
    # the first convs (one input: H1) and the depthwise ones (one channel per group: H2) fuse; the 1x1
    # convs (4 and 6 input channels per group) cannot, nor what reads them
    assert len(convs) == 1 + 2 + 2
    assert removed == 5 - 1  # conv1, BN, Clip, depthwise, Relu of task 1; one Split


def test_computed_weights_and_a_graph_output_inside_a_branch():
    model = branches([4, 4], computed=True, middle_output=True)
    fused, removed = fuse_branches(model)
    assert removed > 0
    check_same(fused, model)
    assert "t0/dr" in [o.name for o in fused.graph.output]


def test_opset_11_splits_by_attribute():
    model = branches([4, 4], opset=11)
    fused, _ = fuse_branches(model)
    check_same(fused, model)
    split = next(n for n in fused.graph.node if n.op_type == "Split")
    assert [a.name for a in split.attribute] == ["axis", "split"] and len(split.input) == 1


def test_a_model_with_one_branch_is_left_as_it_was():
    model = branches([4])
    fused, removed = fuse_branches(model)
    assert removed == 0 and fused is model


@pytest.mark.parametrize("opset", [17, 11])
def test_layers_of_one_group_per_task_written_block_diagonal_compute_the_same(opset):
    """(H6): the heads (Gemm) and the 1x1 convs of group 1 reading the tasks' parts, as one layer whose
    weight is block-diagonal (Pad nodes, folded by onnxruntime); eligible says what each would add."""
    model = branches([4, 4], opset=opset)
    eligible = {}
    fused, removed = fuse_branches(model, eligible=eligible)
    # pw: 4 outputs x 4 other-task channels x 8x8 pixels, per task; fc: 3 outputs x 64 other-task features
    assert eligible == {"t0/pw": 2 * 4 * 4 * 64, "t0/fc": 2 * 3 * 64}
    dense, removed_dense = fuse_branches(model, dense=frozenset(eligible))
    check_same(dense, model)
    assert removed_dense == removed + 1  # one Gemm, not two; the Split moves after it
    assert ops(dense).count("Gemm") == 1 and ops(dense).count("Split") == 1
    pw = next(n for n in dense.graph.node if n.name == "t0/pw_fused")
    assert {a.name: helper.get_attribute_value(a) for a in pw.attribute}.get("group", 1) == 1
    assert ops(dense).count("Pad") == 4  # each task's weight padded to the other's channels (folded)


def test_block_diagonal_before_opset_11_pads_by_attribute():
    model = depthwise_first([1, 1], opset=10)
    eligible = {}
    fuse_branches(model, eligible=eligible)
    # the 1x1 convs (H6), and the depthwise ones on the shared conv computed twice (H1''): 4 x 3x3 x 8x8
    assert eligible == {"t0/pw": 2 * 3 * 4 * 64, "t0/dw": 4 * 9 * 64}
    dense, _ = fuse_branches(model, dense=frozenset({"t0/pw"}))
    check_same(dense, model)
    pads = [n for n in dense.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(len(n.input) == 1 and n.attribute[0].name == "pads" for n in pads)


@pytest.mark.parametrize("keep", [(True, True, True), (True, False, True), (True, True, False), (False, True, True)])
def test_auto_writes_layers_block_diagonal_one_by_one_where_the_model_ran_faster(monkeypatch, keep):
    """After the grouping rules, each H6 layer (the cheapest first) is timed against the model kept
    so far and kept where faster (timings stubbed); `on` with the layers' names replays the choice."""
    model = branches([4, 4])
    decisions = iter(keep)
    calls = []

    def timed(models, baseline, *args, **kwargs):
        (form,) = set(models) - {baseline}
        calls.append((form, baseline))
        q1 = 1.1 if next(decisions) else 0.9
        return {form: {"ratio": q1 + 0.05, "ratio_q1": q1, "ratio_q3": q1 + 0.1}}

    monkeypatch.setattr(fuse_module, "time_models", timed)
    kept, record = apply(model, "auto")
    if not keep[0]:  # nothing grouped: nothing to write block-diagonal
        assert calls == [("1x1", "unfused")] and kept is model
        return
    after_fc = "t0/fc" if keep[1] else "1x1"
    assert calls == [("1x1", "unfused"), ("t0/fc", "1x1"), ("t0/pw", after_fc)]
    want = [layer for layer, k in zip(("t0/fc", "t0/pw"), keep[1:]) if k]
    assert record["dense"] == want and [t["added_macs"] for t in record["timed"][1:]] == [384, 2048]
    assert [t["rewrite"] for t in record["timed"]] == [None, "H6", "H6"]
    assert ops(kept) == ops(fuse_branches(model, dense=frozenset(want))[0])
    replay, again = apply(model, "on", record["kernels"], tuple(record["dense"]))
    assert ops(replay) == ops(kept) and again["dense"] == want
    check_same(kept, model)
    from onnxmerge.measure.report import _fuse_branches_line

    line = _fuse_branches_line(record)
    assert "depthwise and 1x1 convolutions grouped (10 node(s) saved) ran 1.15x [1.10-1.20] the speed of the unfused model, kept" in line
    verdict = lambda k: "kept" if k else "not kept (not faster in three of four rounds)"  # noqa: E731
    assert f"t0/fc block-diagonal (384 multiplications more) ran {1.15 if keep[1] else 0.95:.2f}x" in line
    assert f"the speed of the model with depthwise and 1x1 convolutions grouped, {verdict(keep[1])}" in line
    assert "t0/pw block-diagonal (2,048 multiplications more)" in line
    assert line.endswith(f"the speed of the {'model before it' if keep[1] else 'model with depthwise and 1x1 convolutions grouped'}, {verdict(keep[2])}")


def test_apply_records_and_auto_keeps_the_fused_form_only_when_it_ran_faster():
    model = branches([4, 4])
    assert apply(model, "off") == (model, None)
    fused, record = apply(model, "on")
    assert record["kept"] and record["fused_nodes"] == 10 and "timed" not in record and record["rel_diff"] <= 1e-5
    assert record["kernels"] == "1x1"
    kept, record = apply(model, "auto")  # which form it keeps follows this machine's timing
    timed, *dense = record["timed"]  # grouping every kernel fuses nothing more here: one rule timed
    assert timed["kernels"] == "1x1" and timed["against"] == "unfused" and record["batch"] == 1
    assert {"ratio", "ratio_q1", "ratio_q3"} <= set(timed)
    assert (len(ops(kept)) < len(ops(model))) == record["kept"] == timed["kept"]
    # then, on a fused form, the layers H6 can write block-diagonal (the heads, the 1x1 convs)
    assert [t["dense"] for t in dense] == (["t0/fc", "t0/pw"] if record["kept"] else [])
    assert record["dense"] == [t["dense"] for t in dense if t["kept"]]


@pytest.mark.parametrize("faster", [(False, False), (False, True), (True, False), (True, True)])
def test_auto_times_each_form_against_the_one_kept_before_it(monkeypatch, faster):
    """The 1x1 rule's model against the unfused one, then every kernel's against whichever was kept:
    a form is kept where its paired rounds' lower quartile is above 1 (timings stubbed)."""
    model = branches([4, 4], kernel=3)
    against = []

    def timed(models, baseline, *args, **kwargs):
        (form,) = set(models) - {baseline}
        against.append((form, baseline))
        q1 = 1.1 if form in ("1x1", "any") and faster[("1x1", "any").index(form)] else 0.9  # no H6 layer faster
        return {form: {"ratio": q1 + 0.05, "ratio_q1": q1, "ratio_q3": q1 + 0.1}}

    monkeypatch.setattr(fuse_module, "time_models", timed)
    kept, record = apply(model, "auto")
    first = "1x1" if faster[0] else "unfused"
    assert against[:2] == [("1x1", "unfused"), ("any", first)]
    assert [t["kept"] for t in record["timed"][:2]] == list(faster) and record["kept"] == any(faster)
    assert not record["dense"] and all(t["dense"] and not t["kept"] for t in record["timed"][2:])
    want = "any" if faster[1] else "1x1" if faster[0] else None
    assert record["kernels"] == want
    expected = fuse_branches(model, kernels=want)[0] if want else model
    assert ops(kept) == ops(expected)
    if want:
        check_same(kept, model)


def test_merge_fuses_last_and_reports_it(tmp_path):
    pair = [shipped(MODELS / "mobilenet_mnist.onnx"), shipped(MODELS / "mobilenet_fashion.onnx")]
    on = merge(pair, tmp_path / "on.onnx", method="pack", fuse_branches="on")
    off = merge(pair, tmp_path / "off.onnx", method="pack", fuse_branches="off")
    assert on.info.fidelity["fuse_branches"]["kept"] and "fuse_branches" not in off.info.fidelity
    assert len(ops(on.model)) < len(ops(off.model))
    check_same(on.model, off.model)
    # the layers' weights stay under their names (one task's Clip bounds serve both, the other's go)
    weights = {n.input[k] for n in off.model.graph.node if n.op_type in ("Conv", "Gemm") for k in (1, 2)
               if k < len(n.input)}
    assert weights and weights <= {i.name for i in on.model.graph.initializer}
    with pytest.raises(UsageError, match="--fuse-branches sometimes"):
        merge(pair, method="pack", fuse_branches="sometimes")


def test_a_merge_and_a_search_candidate_are_calibrated_unfused_then_fused(monkeypatch):
    """Calibration's per-layer loss reads the tasks' own tensors: both calibrate the unfused model and
    fuse its calibrated weights after (outputs as the calibrated unfused model's, to float rounding)."""
    from onnxmerge.calibration.calibrate import CalibrationConfig
    from onnxmerge.data import load_dataset
    from onnxmerge.search import trial as trial_module

    pair = [str(shipped(MODELS / "mobilenet_mnist.onnx")), str(shipped(MODELS / "mobilenet_fashion.onnx"))]
    names = ["mnist", "fashion"]
    calib = {n: load_dataset(shipped(MODELS / f"{n}_eval.npz")).take(64) for n in names}
    config = CalibrationConfig(steps=3, batch_size=16)
    fused_nodes = lambda m: [n.name for n in m.graph.node if n.name.endswith("_fused")]  # noqa: E731
    plain = merge(pair, method="zipper", names=names, params={"share": 2}, calib=calib, calibration=config,
                  fuse_branches="off").model
    fused = merge(pair, method="zipper", names=names, params={"share": 2}, calib=calib, calibration=config).model
    assert not fused_nodes(plain) and fused_nodes(fused)
    check_same(fused, plain)

    calibrated = []  # (the model calibration was given, what it returned)
    real = trial_module.calibrate

    def spy(model, *args, **kwargs):
        calibrated.append((model, real(model, *args, **kwargs)))
        return calibrated[-1][1]

    monkeypatch.setattr(trial_module, "calibrate", spy)
    base = merge(pair, method="pack", names=names, fuse_branches="off")
    setup = trial_module.Setup(pair, names, calib, calib, dict(zip(names, pair)),
                               trial_module.correct(base.model, base.info, calib), 0, config, 0.1, False)
    trial = trial_module.run_trial(setup, "zipper", {"share": 2}, max_loss=-1)  # nothing is within -1: calibrated
    (before, after), = calibrated
    assert trial.calibrated and not fused_nodes(before) and fused_nodes(trial.model)
    assert trial.info.fidelity["fuse_branches"]["kept"]
    check_same(trial.model, after.model)


def test_a_calibrated_search_candidate_is_fused_as_auto_chose(monkeypatch):
    """auto's choice (here every kernel grouped: timings stubbed) is what the calibrated candidate is
    fused with: the LeNets' 5x5 convolutions, which the 1x1 rule leaves per task, grouped."""
    from onnxmerge.calibration.calibrate import CalibrationConfig
    from onnxmerge.data import load_dataset
    from onnxmerge.search import trial as trial_module

    monkeypatch.setattr(fuse_module, "time_models", lambda models, baseline, *a, **k: {  # the Gemms: H6
        form: {"ratio": 1.2, "ratio_q1": 1.1 if form == "any" or "Gemm" in form else 0.9, "ratio_q3": 1.3}
        for form in models})
    pair = [str(shipped(MODELS / "lenet_mnist.onnx")), str(shipped(MODELS / "lenet_fashion.onnx"))]
    names = ["mnist", "fashion"]
    calib = {n: load_dataset(shipped(MODELS / f"{n}_eval.npz")).take(64) for n in names}
    config = CalibrationConfig(steps=3, batch_size=16)
    base = merge(pair, method="pack", names=names, fuse_branches="off")
    setup = trial_module.Setup(pair, names, calib, calib, dict(zip(names, pair)),
                               trial_module.correct(base.model, base.info, calib), 0, config, 0.1, False, "auto")
    trial = trial_module.run_trial(setup, "pack", {}, max_loss=-1)  # nothing is within -1: calibrated
    assert trial.calibrated and trial.info.fidelity["fuse_branches"]["kernels"] == "any"
    attrs = [{a.name: helper.get_attribute_value(a) for a in n.attribute}
             for n in trial.model.graph.node if n.op_type == "Conv"]
    # the second convolution of each LeNet (5x5, group 1, reading its task's part): one of group 2
    assert [a["group"] for a in attrs if list(a["kernel_shape"]) == [5, 5]] == [1, 2]
    # and its three fully connected layers per task, each one block-diagonal layer (H6)
    assert len(trial.info.fidelity["fuse_branches"]["dense"]) == 3
    assert [n.op_type for n in trial.model.graph.node].count("Gemm") == 3


def test_the_command_line_flag_and_the_report(tmp_path, capsys):
    from onnxmerge.cli import main

    pair = [str(shipped(MODELS / "mobilenet_mnist.onnx")), str(shipped(MODELS / "mobilenet_fashion.onnx"))]
    for flag in ("on", "off"):
        out = tmp_path / f"{flag}.onnx"
        assert main([*pair, "-o", str(out), "--method", "pack", "--fuse-branches", flag, "--no-latency"]) == 0
        text = capsys.readouterr().out
        fused = [n for n in onnx.load(str(out)).graph.node if n.name.endswith("_fused")]
        assert bool(fused) == (flag == "on")
        assert ("--fuse-branches on: the tasks' parallel layers as one grouped layer would save" in text) == (flag == "on")
    assert main([*pair, "-o", str(tmp_path / "x.onnx"), "--fuse-branches", "sometimes"]) == 2
    assert "--fuse-branches" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
