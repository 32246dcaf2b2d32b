"""Calibration: fine-tuning a merged model against its originals, and writing it back to ONNX."""

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import MODELS, shipped
from onnxmerge.api import merge
from onnxmerge.calibration.calibrate import CalibrationConfig, calibrate
from onnxmerge.calibration.calibrate import perturb_weights as perturb
from onnxmerge.data import Dataset, load_dataset, load_named, shared_data_dir
from onnxmerge.errors import MergeError, UsageError
from onnxmerge.measure.evaluate import evaluate
from onnxmerge.model.contract import read_metadata

PAIR = [MODELS / "lenet_mnist.onnx", MODELS / "lenet_fashion.onnx"]
NAMES = ["mnist", "fashion"]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "packed.onnx"
    return merge([shipped(p) for p in PAIR], path, method="pack", names=NAMES), path


def subsets():
    """The shipped evaluation subsets, split: first 300 to calibrate, the other 200 to check."""
    out = {}
    for task, file in (("mnist", "mnist_eval.npz"), ("fashion", "fashion_eval.npz")):
        ds = load_dataset(shipped(MODELS / file))
        out[task] = (ds.take(300), Dataset(ds.x[300:], ds.y[300:], ds.source, ds.preprocessing))
    return out


def quick(**kw) -> CalibrationConfig:
    return CalibrationConfig(**({"steps": 40, "batch_size": 32, "lr": 1e-3} | kw))


def test_calibration_is_deterministic_and_seeded(packed):
    result, _ = packed
    calib = {t: c for t, (c, _) in subsets().items()}
    noisy = perturb(result.model, 0.3)
    a = calibrate(noisy, result.info, dict(zip(NAMES, PAIR)), calib, quick(), progress=False)
    b = calibrate(noisy, result.info, dict(zip(NAMES, PAIR)), calib, quick(), progress=False)
    c = calibrate(noisy, result.info, dict(zip(NAMES, PAIR)), calib, quick(seed=1), progress=False)
    wa, wb, wc = weights(a.model), weights(b.model), weights(c.model)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert any(not np.array_equal(wa[k], wc[k]) for k in wa)
    assert any(not np.array_equal(wa[k], v) for k, v in weights(noisy).items())
    # same graph, new values
    assert [n.name for n in a.model.graph.node] == [n.name for n in noisy.graph.node]
    # tasks interleaved batch by batch
    assert [h["task"] for h in a.history[:4]] == ["mnist", "fashion", "mnist", "fashion"]
    assert {"ce", "layer", "kd"} <= set(a.history[0])


def test_label_free_calibration_reduces_the_loss_and_uses_no_labels(packed):
    result, _ = packed
    calib = {t: Dataset(c.x, None, c.source, c.preprocessing) for t, (c, _) in subsets().items()}
    noisy = perturb(result.model, 0.3)
    out = calibrate(noisy, result.info, dict(zip(NAMES, PAIR)), calib, quick(steps=60), progress=False)
    assert all("ce" not in h for h in out.history)
    summary = out.summary()
    for task in NAMES:
        assert summary[task]["loss_last"] < 0.7 * summary[task]["loss_first"], summary


def test_frozen_weights_do_not_change(packed):
    result, _ = packed
    calib = {t: c for t, (c, _) in subsets().items()}
    noisy = perturb(result.model, 0.3)
    frozen = [k for k in weights(noisy) if k.startswith("mnist/")]
    out = calibrate(noisy, result.info, dict(zip(NAMES, PAIR)), calib, quick(), frozen=tuple(frozen), progress=False)
    before, after = weights(noisy), weights(out.model)
    assert all(np.array_equal(before[k], after[k]) for k in frozen)
    assert any(not np.array_equal(before[k], after[k]) for k in after if k.startswith("fashion/"))


def test_bad_calibration_input_is_refused(packed):
    result, _ = packed
    teachers = dict(zip(NAMES, PAIR))
    wrong = Dataset(np.zeros((4, 1, 32, 32), np.float32), None, "wrong.npz", {})
    with pytest.raises(MergeError, match=r"--calib mnist: data wrong.npz has samples of shape \(1,32,32\)"):
        calibrate(result.model, result.info, teachers, {"mnist": wrong}, quick(), progress=False)
    with pytest.raises(MergeError, match="no task named 'digits'"):
        calibrate(result.model, result.info, teachers, {"digits": wrong}, quick(), progress=False)
    with pytest.raises(UsageError, match="--lr=-1"):
        quick(lr=-1).validate()


def test_cli_calibrate_writes_model_and_reports_before_and_after(packed, tmp_path, capsys):
    from onnxmerge.cli import main

    _, path = packed
    sub = subsets()
    files = {}
    for task, (calib, check) in sub.items():
        files[task] = (tmp_path / f"{task}_calib.npz", tmp_path / f"{task}_check.npz")
        np.savez(files[task][0], x=calib.x, y=calib.y)
        np.savez(files[task][1], x=check.x, y=check.y)
    out = tmp_path / "calibrated.onnx"
    args = ["calibrate", str(path), "-o", str(out), "--steps", "20", "--batch-size", "16", "--no-latency", "-q",
            "--report", str(tmp_path / "r.json")]
    for task, (c, e) in files.items():
        args += ["--calib", f"{task}={c}", "--data", f"{task}={e}"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "Calibration: 20 steps" in text and "acc before" in text
    info = read_metadata(onnx.load(str(out)))
    assert info.params["calibration"]["steps"] == 20
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["calibration"]["before"]) == set(NAMES)


def test_merge_with_calib_calibrates_as_last_step(tmp_path):
    sub = subsets()
    calib = {t: c for t, (c, _) in sub.items()}
    result = merge(PAIR, tmp_path / "m.onnx", names=NAMES, calib=calib, calibration=quick(steps=10))
    assert result.info.params["calibration"]["steps"] == 10
    assert read_metadata(onnx.load(str(tmp_path / "m.onnx"))).params["calibration"]["steps"] == 10


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_match_one(packed, tmp_path):
    _, path = packed
    sub = subsets()
    args = ["calibrate", str(path), "--steps", "12", "--batch-size", "32", "--lr", "1e-3", "--no-latency", "-q"]
    for task, (calib, _) in sub.items():
        f = tmp_path / f"{task}.npz"
        np.savez(f, x=calib.x, y=calib.y)
        args += ["--calib", f"{task}={f}"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "onnxmerge", *args, "-o", str(tmp_path / "one.onnx")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "onnxmerge", *args,
                          "-o", str(tmp_path / "two.onnx")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    w1, w2 = weights(onnx.load(str(tmp_path / "one.onnx"))), weights(onnx.load(str(tmp_path / "two.onnx")))
    base = weights(onnx.load(str(path)))
    assert any(not np.array_equal(w1[k], base[k]) for k in w1)  # it trained
    worst = max(float(np.max(np.abs(w1[k] - w2[k]))) for k in w1)
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def full(packed):
    """The full train and test splits, and the pack model's test accuracy (evaluated once for the tests below)."""
    if shared_data_dir() is None:
        pytest.skip("../shared/data not found: full-dataset calibration test skipped")
    calib = {"mnist": load_named("mnist", "train"), "fashion": load_named("fashion-mnist", "train")}
    test = {"mnist": load_named("mnist", "test"), "fashion": load_named("fashion-mnist", "test")}
    result, _ = packed
    return calib, test, evaluate(result.model, result.info, test, progress=False)


def test_calibrating_pack_keeps_accuracy_on_full_test_sets(packed, full):
    """Acceptance: calibrating a pack model (nothing shared) moves no task's accuracy by more than 0.1 points."""
    calib, test, before = full
    result, _ = packed
    out = calibrate(result.model, result.info, dict(zip(NAMES, PAIR)), calib, CalibrationConfig(), progress=False)
    after = evaluate(out.model, result.info, test, progress=False)
    for task in NAMES:
        assert abs(after[task]["accuracy"] - before[task]["accuracy"]) <= 0.001, (task, before[task], after[task])


@pytest.mark.parametrize("labels,tolerance", [(True, 0.01), (False, 0.02)], ids=["labels", "label-free"])
def test_recovery_from_weight_noise(packed, full, labels, tolerance):
    """Acceptance: noise costs >= 10 points; <= 500 steps bring each task back within 1 point
    (labels) or 2 points (label-free) of the original."""
    calib, test, original = full
    result, _ = packed
    noisy = perturb(result.model, sigma=0.5, seed=0)
    hurt = evaluate(noisy, result.info, test, progress=False)
    assert all(original[t]["accuracy"] - hurt[t]["accuracy"] >= 0.10 for t in NAMES), (original, hurt)
    config = CalibrationConfig(steps=500, lr=3e-3, use_labels=labels)
    out = calibrate(noisy, result.info, dict(zip(NAMES, PAIR)), calib, config, progress=False)
    healed = evaluate(out.model, result.info, test, progress=False)
    for t in NAMES:
        assert original[t]["accuracy"] - healed[t]["accuracy"] <= tolerance, (t, original[t], hurt[t], healed[t])


def test_settings_are_not_trained():
    """ReLU6's bounds (Clip inputs) are settings, not weights: calibration leaves them alone."""
    from onnxmerge.calibration.calibrate import trainable_names

    model = merge([MODELS / "mobilenet_mnist.onnx", MODELS / "mobilenet_fashion.onnx"], names=NAMES,
                  fuse_branches="off").model  # each conv reads its weight (fused: a Concat of them)
    clip_bounds = {i for n in model.graph.node if n.op_type == "Clip" for i in n.input[1:]}
    assert clip_bounds and not clip_bounds & trainable_names(model)
    convs = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert convs <= trainable_names(model)
    # the tasks' branches fused (pack keeps BatchNorm): the running statistics a Concat gathers stay
    # settings, the weights it gathers are trained
    fused = merge([MODELS / "mobilenet_mnist.onnx", MODELS / "mobilenet_fashion.onnx"], names=NAMES,
                  method="pack").model
    stats = {i for n in fused.graph.node if n.op_type == "BatchNormalization" for i in n.input[3:5]}
    gathered = {i for n in fused.graph.node if n.op_type == "Concat" and n.output[0] in stats for i in n.input}
    weights = {i for n in fused.graph.node if n.op_type == "Concat" and n.output[0].endswith("_fused_W")
               for i in n.input}
    assert gathered and weights and not gathered & trainable_names(fused) and weights <= trainable_names(fused)


# ---------------------------------------------------------------------------------------------------
# early stopping and the learning-rate schedule


def held_out_accuracy(model, info, task: str, ds: Dataset, config: CalibrationConfig) -> float:
    """The accuracy on the samples calibration holds out, found again as calibrate draws them."""
    _, held = ds.split(min(config.holdout, len(ds) // 5), seed=config.seed)
    return evaluate(model, info, {task: held}, progress=False)[task]["accuracy"]


def test_early_stopping_stops_and_restores_the_best_weights(packed):
    """The pack model is the originals exactly, so the start scores best; a destructive learning
    rate makes every later evaluation worse: the run stops after `patience` of them and returns the
    starting weights bit for bit."""
    result, _ = packed
    calib = {t: c for t, (c, _) in subsets().items()}
    config = quick(steps=60, lr=0.5, eval_every=10, patience=2)
    out = calibrate(result.model, result.info, dict(zip(NAMES, PAIR)), calib, config, progress=False)
    assert [e["step"] for e in out.evals] == [0, 10, 20]
    assert len(out.history) == 20 < config.steps  # stopped early
    assert all(e["score"] < out.evals[0]["score"] for e in out.evals[1:])
    start, got = weights(result.model), weights(out.model)
    assert [k for k in start if not np.array_equal(start[k], got[k])] == []
    assert out.summary()["early_stopping"]["best_step"] == 0


def test_early_stopping_keeps_the_best_evaluation(packed):
    """From noisy weights calibration improves; the model returned scores, on the held-out samples
    (drawn again here), the best evaluation's accuracy, which is not the start's."""
    result, _ = packed
    calib = {t: c for t, (c, _) in subsets().items()}
    noisy = perturb(result.model, 0.5)
    config = quick(steps=90, eval_every=15, patience=10)
    out = calibrate(noisy, result.info, dict(zip(NAMES, PAIR)), calib, config, progress=False)
    best = max(out.evals, key=lambda e: e["score"])
    assert best["step"] > 0
    for task in NAMES:
        assert held_out_accuracy(out.model, result.info, task, calib[task], config) == pytest.approx(best[task]["accuracy"])


def test_resume_with_early_stopping_equals_uninterrupted(packed, tmp_path, monkeypatch):
    """Interrupted (SIGINT) right after an evaluation and resumed from its checkpoint, a run with
    early stopping ends with the weights, evaluations and stopping step of an uninterrupted one."""
    import signal

    from onnxmerge.calibration import calibrate as cal

    result, _ = packed
    calib = {t: c for t, (c, _) in subsets().items()}
    noisy = perturb(result.model, 0.5)
    config = quick(steps=45, eval_every=10, patience=2, lr=3e-3)
    teachers = dict(zip(NAMES, PAIR))
    reference = calibrate(noisy, result.info, teachers, calib, config, progress=False)
    real, calls = cal._EarlyStopping.evaluate, []

    def evaluate_then_interrupt(self):
        stop = real(self)
        calls.append(self.trainer.step)
        if len(calls) == 2:  # the first evaluation inside the loop (the start's is before it)
            os.kill(os.getpid(), signal.SIGINT)
        return stop

    monkeypatch.setattr(cal._EarlyStopping, "evaluate", evaluate_then_interrupt)
    ckpt = cal.Checkpoint(tmp_path / "c.ckpt", every=1000)
    # Ctrl-C's handler, as in a terminal (a shell that starts the tests in the background ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            calibrate(noisy, result.info, teachers, calib, config, progress=False, checkpoint=ckpt.validate())
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(cal._EarlyStopping, "evaluate", real)
    resumed = calibrate(noisy, result.info, teachers, calib, config, progress=False,
                        checkpoint=cal.Checkpoint(tmp_path / "c.ckpt", every=1000, resume=True).validate())
    want, got = weights(reference.model), weights(resumed.model)
    assert [k for k in want if not np.array_equal(want[k], got[k])] == []
    assert resumed.evals == reference.evals and len(resumed.history) == len(reference.history)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    import torch

    from onnxmerge.calibration.calibrate import _scheduler

    config = CalibrationConfig(steps=100, lr=1e-3, warmup=0.1)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched = _scheduler(torch, opt, config)
    lrs = []
    for _ in range(config.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never up
    assert lrs[55] == pytest.approx(5e-4, rel=1e-6) and lrs[-1] < 1e-6  # half way down at the middle, ~0 at the end


def test_short_budgets_hold_nothing_out():
    """Fewer than three evaluations in the budget, or tiny data: every sample trains, no early stopping."""
    from onnxmerge.calibration.calibrate import _hold_out

    ds = {t: c for t, (c, _) in subsets().items()}
    assert _hold_out(ds, CalibrationConfig(steps=299))[1] == {}
    assert _hold_out({t: d.take(200) for t, d in ds.items()}, CalibrationConfig())[1] == {}
    train, held = _hold_out(ds, CalibrationConfig())
    assert {t: len(h) for t, h in held.items()} == {"mnist": 60, "fashion": 60}
    assert {t: len(d) for t, d in train.items()} == {"mnist": 240, "fashion": 240}


def test_the_start_is_kept_unless_beaten_by_more_than_its_noise():
    """Early stopping: while the starting weights are the best, a later evaluation must beat their mean
    held-out accuracy by more than its standard error (`margin`) to replace them; after that, any gain counts."""
    from types import SimpleNamespace

    from onnxmerge.calibration.calibrate import _EarlyStopping

    stopper = object.__new__(_EarlyStopping)
    stopper.trainer = SimpleNamespace(evals=[{"step": 0, "score": [0.90, -0.1], "margin": 0.01}])
    assert not stopper._beats_start([0.905, 0.0])  # within the noise, even with a better loss
    assert stopper._beats_start([0.915, -1.0])
    stopper.trainer.evals.append({"step": 100, "score": [0.905, 0.0], "kept": False})  # taken within the noise
    assert not stopper._beats_start([0.906, 0.0])  # a rejected evaluation does not lower the bar
    stopper.trainer.evals.pop()
    stopper.trainer.evals.append({"step": 100, "score": [0.95, -0.1]})  # the start is no longer the best
    assert stopper._beats_start([0.951, -0.1])
    stopper.trainer.evals[:] = [{"step": 0, "score": [-0.2]}]  # label-free: no margin, the loss decides
    assert stopper._beats_start([-0.19])
