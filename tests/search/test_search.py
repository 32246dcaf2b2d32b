"""The budgeted search (`--max-loss`): its data split, its bisection and pruning, its choice and
fronts, the budget of 0, and the command end to end on the shipped example pair."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time

import numpy as np
import onnx
import pytest

from conftest import EXAMPLES, MODELS, shipped
from onnxmerge.calibration.calibrate import CalibrationConfig
from onnxmerge.cli import main
from onnxmerge.data import Dataset, load_dataset
from onnxmerge.errors import MergeError, UsageError
from onnxmerge.model.contract import read_metadata
from onnxmerge.model.runtime import session
from onnxmerge.pipeline.method import Knob
from onnxmerge.search import run as search_run
from onnxmerge.search.front import beats, choose, pareto
from onnxmerge.search.run import search, split_validation
from onnxmerge.search.trial import Trial

PAIR = ("fashion_lenet", "digits_lenet")


def _calib(task: str) -> str:
    return str(shipped(EXAMPLES / f"{task.split('_')[0]}_calib.npz"))


def _trial(method, size, loss, speedup=1.0, **params) -> Trial:
    return Trial(method, params, bytes=size, speedup=speedup, accuracy={"a": 0.9}, loss={"a": loss})


def test_held_out_data_is_disjoint_from_calibration_data():
    x = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    ds = Dataset(x, np.arange(50) % 10, "d.npz", {})
    train, held, where = split_validation({"t": ds}, None)
    assert len(held["t"]) == 10 and len(train["t"]) == 40 and "held out" in where["t"]
    assert not set(train["t"].x.ravel()) & set(held["t"].x.ravel())
    given = Dataset(x[:5], np.zeros(5, np.int64), "v.npz", {})
    train, held, where = split_validation({"t": ds}, {"t": given})
    assert train["t"] is ds and held["t"] is given and "--validation v.npz" in where["t"]
    with pytest.raises(UsageError, match="no labels"):
        split_validation({"t": Dataset(x, None, "u.npz", {})}, None)
    with pytest.raises(UsageError, match="cannot be split"):
        split_validation({"t": Dataset(x[:1], np.zeros(1, np.int64), "one.npz", {})}, None)


def test_choice_and_fronts():
    pack = _trial("pack", 1000, 0.0, 1.0)
    small_bad = _trial("codebook", 100, 3.0, 0.9)
    mid_ok = _trial("codebook", 300, 0.5, 1.2)
    big_ok = _trial("zipper", 600, 0.2, 1.8)
    dominated = _trial("mtz", 700, 0.9, 1.1)
    trials = [pack, small_bad, mid_ok, big_ok, dominated]
    assert choose(trials, 1.0, "size") is mid_ok
    assert choose(trials, 1.0, "latency") is big_ok
    assert choose(trials, 0.1, "size") is pack
    assert pareto(trials, "size") == [small_bad, mid_ok, big_ok, pack]
    assert pareto(trials, "latency") == [big_ok, pack]  # big_ok is faster and better than mid_ok


def test_latency_ties_within_the_measurement_s_spread_go_to_the_smaller_model():
    """Two models of the same work (pack, and codebooks that fold to dense weights) differ in measured
    speed by noise alone: where their per-round quartiles overlap, the smaller one is chosen, and a
    smaller model as fast within the noise can replace the best in the search's pruning."""
    pack = _trial("pack", 1000, 0.0, 1.08)
    coded = _trial("codebook", 200, 0.3, 1.05)
    pack.speedup_quartiles, coded.speedup_quartiles = (1.04, 1.11), (1.02, 1.07)
    assert choose([pack, coded], 1.0, "latency") is coded and beats(coded, pack, "latency")
    assert not beats(pack, coded, "latency")  # as fast, but larger
    coded.speedup_quartiles = (1.00, 1.03)  # apart from pack's: pack is faster
    assert choose([pack, coded], 1.0, "latency") is pack and not beats(coded, pack, "latency")
    fast = _trial("zipper", 900, 0.5, 1.5)
    fast.speedup_quartiles = (1.45, 1.55)
    assert choose([pack, coded, fast], 1.0, "latency") is fast and beats(fast, coded, "latency")


@pytest.fixture
def fake_trials(monkeypatch):
    """run_trial replaced by a model of a method whose loss grows with its knob k (loss = k - 2
    points, within a budget of 1 up to k = 3) and whose size falls with it; records each call."""
    calls = []

    def fake_run_trial(setup, method, params, max_loss, beats=None, warm_start=None, same=None):
        calls.append((method, dict(params), warm_start))
        k = params.get("k", 0)
        t = Trial(method, dict(params), bytes=1000 - 100 * k, speedup=1.0 + k / 10,
                  accuracy={n: 0.9 for n in setup.names}, loss={n: max(0.0, k - 2.0) for n in setup.names})
        t.model = onnx.ModelProto()
        if beats is not None and not beats(t):
            t.status, t.model, t.loss, t.accuracy = "skipped: cannot beat the best model found so far", None, {}, {}
        return t

    knob = Knob(lambda n: [{"k": k} for k in range(1, 9)], "k")
    from onnxmerge.passes import METHODS

    for name in ("zipper", "codebook"):
        method = METHODS[name]
        monkeypatch.setitem(METHODS, name, type(method)(**{**method.__dict__, "search": knob}))
    for name, method in list(METHODS.items()):  # the fake trials merge any models, whatever their inputs
        monkeypatch.setitem(METHODS, name, dataclasses.replace(method, one_input=False))
    monkeypatch.setattr(search_run, "run_trial", fake_run_trial)
    return calls


def _search_examples(**kwargs):
    names = list(PAIR)
    calib = {n: load_dataset(_calib(n)) for n in names}
    return search([shipped(EXAMPLES / f"{n}.onnx") for n in names], names, calib, progress=False,
                  log=lambda line: None, **kwargs)


def test_bisection_finds_the_most_aggressive_setting_within_budget(fake_trials):
    result = _search_examples(methods=["zipper"], max_loss=1.0)
    tried = [p["k"] for m, p, _ in fake_trials if m == "zipper"]
    assert result.chosen.params == {"k": 3}  # loss 1.0: the last within the budget
    assert len(tried) <= 4 and 3 in tried and 4 in tried  # log2(8 + 1) rounded up, the boundary seen
    # warm starts come from the last setting within the budget (zipper's share is its sweep knob: k is not)
    assert all(w is None for _, _, w in fake_trials)


def test_validation_held_out_of_calib_is_flagged_and_given_validation_is_not(fake_trials):
    # held out of --calib: the notes warn that losses read high if the models trained on these samples
    names = list(PAIR)
    held = _search_examples(methods=["zipper"], max_loss=1.0)
    flagged = [n for n in held.notes if n.startswith("validation of ")]
    assert len(flagged) == 1 and all(t in flagged[0] for t in names) and "--validation" in flagged[0]
    given = _search_examples(methods=["zipper"], max_loss=1.0,
                             validation={n: load_dataset(_calib(n)) for n in names[:1]})
    (partly,) = [n for n in given.notes if n.startswith("validation of ")]
    assert partly.startswith(f"validation of {names[1]}: held out")
    every = _search_examples(methods=["zipper"], max_loss=1.0, validation={n: load_dataset(_calib(n)) for n in names})
    assert not any(n.startswith("validation of ") for n in every.notes)


def test_a_setting_that_cannot_beat_the_best_is_not_calibrated(fake_trials):
    # zipper finds k=3 (700 bytes); codebook's k=4 is smaller but over the budget, and its k=2 and k=3
    # cannot beat 700 bytes: they are skipped, not measured
    result = _search_examples(methods=["zipper", "codebook"], max_loss=1.0)
    assert result.chosen.method == "zipper" and result.chosen.params == {"k": 3}
    codebook = [t for t in result.trials if t.method == "codebook"]
    assert [(t.params["k"], t.status.split(":")[0]) for t in codebook] == [(4, "ok"), (2, "skipped"), (3, "skipped")]
    assert all(not t.loss for t in codebook if not t.measured)


def test_methods_whose_strength_is_the_objective_go_first(fake_trials, monkeypatch):
    from onnxmerge.passes import METHODS

    for name, saves in (("zipper", ("latency", "size")), ("codebook", ("size",))):
        method = METHODS[name]
        monkeypatch.setitem(METHODS, name, type(method)(**{**method.__dict__,
                                                           "search": Knob(method.search.ladder, "k", saves)}))
    for objective, first in (("size", "codebook"), ("latency", "zipper")):
        fake_trials.clear()
        _search_examples(methods=["zipper", "codebook"], max_loss=1.0, objective=objective, measure_latency=False)
        assert [m for m, _, _ in fake_trials if m != "pack"][0] == first, objective
    # a knob that saves latency second (mtz's) still goes before one that does not save it at all
    method = METHODS["zipper"]
    monkeypatch.setitem(METHODS, "zipper", type(method)(**{**method.__dict__,
                                                           "search": Knob(method.search.ladder, "k", ("size", "latency"))}))
    fake_trials.clear()
    _search_examples(methods=["codebook", "zipper"], max_loss=1.0, objective="latency", measure_latency=False)
    assert [m for m, _, _ in fake_trials if m != "pack"][0] == "zipper"


def _trials_lasting(monkeypatch, seconds: dict[str, float], others: float = 1.0) -> None:
    """Every trial reports the seconds `seconds` gives its method (`others` for the other methods),
    and the search's clock moves on by as much."""
    real, clock = search_run.run_trial, _Clock()
    monkeypatch.setattr(search_run, "time", clock)

    def timed(*args, **kwargs):
        trial = real(*args, **kwargs)
        trial.seconds = seconds.get(trial.method, others)
        clock.offset += trial.seconds
        return trial

    monkeypatch.setattr(search_run, "run_trial", timed)


class _Clock:
    """The time module as the search reads it, `offset` seconds ahead of the real one."""

    def __init__(self):
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset


def test_a_trial_that_would_overrun_the_time_budget_is_not_started(fake_trials, monkeypatch):
    _trials_lasting(monkeypatch, {"pack": 1.0}, others=1000.0)  # each but the baseline's longer than the budget
    result = _search_examples(methods=["zipper"], max_loss=1.0, time_budget_s=600)
    assert [m for m, _, _ in fake_trials] == ["pack", "zipper"]  # one zipper trial, then the guess says stop
    assert any(n.startswith("time budget spent: zipper settings") for n in result.notes)


def test_a_method_s_first_trial_is_guessed_from_the_methods_before_it(fake_trials, monkeypatch):
    """Before a method has run a trial, the longest trial so far stands for its length: a method whose
    first trial could not end within the budget is not started (once, mtz's first trial ran 48 s past it)."""
    real = search_run.run_trial
    first = []

    def slow(*args, **kwargs):  # the first method searched takes 700 s a trial: one, and the budget is spent
        trial = real(*args, **kwargs)
        if trial.method != "pack":
            first.append(first[0] if first else trial.method)
            trial.seconds = 700.0 if trial.method == first[0] else 1.0
        return trial

    monkeypatch.setattr(search_run, "run_trial", slow)
    result = _search_examples(methods=["zipper", "codebook"], max_loss=1.0, time_budget_s=600, measure_latency=False)
    other = "codebook" if first[0] == "zipper" else "zipper"
    assert [m for m, _, _ in fake_trials] == ["pack", first[0]]
    assert any(n.startswith(f"time budget spent: {other} settings") for n in result.notes), result.notes


def test_every_later_method_is_kept_the_time_of_one_trial_and_what_it_leaves_goes_back(fake_trials, monkeypatch):
    """zipper's trials take 200 s: after its first, a second would eat the 250 s kept for codebook (one
    trial of the longest so far, and a quarter more), so it pauses and codebook is tried (without
    that zipper would bisect on through the whole budget); codebook's trials take 1 s, so zipper goes
    on after it with what is left (a second trial, ending at about 405 s), where it left off. The
    note that it paused goes; the one that says where it stopped stays."""
    _trials_lasting(monkeypatch, {"zipper": 200.0})
    result = _search_examples(methods=["zipper", "codebook"], max_loss=1.0, objective="latency", time_budget_s=600,
                              measure_latency=False)
    tried = [m for m, _, _ in fake_trials]
    first_codebook = tried.index("codebook")
    assert tried[:first_codebook].count("zipper") == 1 and tried.count("codebook") >= 2, tried
    assert tried[first_codebook:].count("zipper") == 1, tried
    assert "codebook" not in tried[tried.index("zipper", first_codebook):], tried
    zipper = [p["k"] for m, p, _ in fake_trials if m == "zipper"]
    assert zipper[1] != zipper[0]  # bisected on from where it paused, not from the start
    assert not any(n.startswith("time budget spent but for") for n in result.notes), result.notes
    assert any(n.startswith("time budget spent: zipper settings") for n in result.notes), result.notes
    assert not any("codebook settings" in n for n in result.notes), result.notes  # nothing kept after the last


def test_the_time_kept_is_judged_by_the_longest_trial_of_any_method(fake_trials, monkeypatch):
    """zipper's one trial took 250 s; mtz's own trials take 1 s, but its next could be calibrated and
    take as long: with 312 s kept for codebook, mtz pauses after its first trial. After codebook the
    paused ones go on in the order they paused: zipper's second trial takes what is left."""
    _trials_lasting(monkeypatch, {"zipper": 250.0})
    _search_examples(methods=["zipper", "mtz", "codebook"], max_loss=1.0, objective="latency", time_budget_s=600,
                     measure_latency=False)
    tried = [m for m, _, _ in fake_trials]
    first_codebook = tried.index("codebook")
    assert tried.index("zipper") < tried.index("mtz") < first_codebook, tried  # latency's order
    assert tried[:first_codebook].count("zipper") == 1 and tried[:first_codebook].count("mtz") == 1, tried
    assert [m for m in tried[first_codebook:] if m != "codebook"] == ["zipper"], tried


def test_the_time_kept_allows_for_the_spread_of_trial_times(fake_trials, monkeypatch):
    """zipper's trials take 280 s: a second would end 40 s before the 600 s budget, just leaving
    codebook one trial as long as the longest, but not one a little longer than that, as trials run
    (search_run.KEPT_SPREAD): zipper pauses after its first."""
    _trials_lasting(monkeypatch, {"zipper": 280.0})
    _search_examples(methods=["zipper", "codebook"], max_loss=1.0, objective="latency", time_budget_s=600,
                     measure_latency=False)
    tried = [m for m, _, _ in fake_trials]
    assert tried[:tried.index("codebook")].count("zipper") == 1, tried


def test_methods_that_share_one_input_are_not_tried_on_models_whose_inputs_differ(fake_trials, monkeypatch):
    """The example pair takes 28x28 and 32x32 images: zipper (and its composition) cannot apply, which
    the baseline merge already tells, so they cost no trial and keep no time from codebook."""
    from onnxmerge.passes import METHODS

    for name in ("zipper", COMPOSED):
        monkeypatch.setitem(METHODS, name, dataclasses.replace(METHODS[name], one_input=True))
    result = _search_examples(methods=["zipper", "codebook", COMPOSED], max_loss=1.0, measure_latency=False)
    assert {m for m, _, _ in fake_trials} == {"pack", "codebook"}, fake_trials
    for name in ("zipper", COMPOSED):
        assert f"{name} does not apply: it shares computation on one input, and these models take inputs of " \
               "different shapes or types" in result.notes, result.notes


def test_budget_zero_returns_the_originals_exactly(tmp_path):
    result = _search_examples(max_loss=0.0, measure_latency=False)
    assert result.chosen.method == "pack" and len(result.trials) == 1
    assert any("budget of 0" in n for n in result.notes)
    model = result.chosen.model
    rng = np.random.default_rng(0)
    x = {"fashion_lenet": rng.standard_normal((3, 1, 28, 28)).astype(np.float32),
         "digits_lenet": rng.standard_normal((3, 1, 32, 32)).astype(np.float32)}
    got = session(model).run([f"{n}/logits" for n in PAIR], {f"{n}/input": x[n] for n in PAIR})
    for name, out in zip(PAIR, got):
        want = session(str(shipped(EXAMPLES / f"{name}.onnx"))).run(None, {"input": x[name]})[0]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_search_command_writes_the_chosen_model_and_its_report(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = [str(shipped(EXAMPLES / f"{n}.onnx")) for n in PAIR] + ["-o", str(out), "--names", ",".join(PAIR)]
    argv += [f"--calib={n}={_calib(n)}" for n in PAIR]
    argv += ["--method", "codebook", "--max-loss", "3", "--steps", "20", "--no-latency", "-q"]
    assert main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    table = json.loads((tmp_path / "m_search.json").read_text())
    assert (tmp_path / "m_search.png").stat().st_size > 0 and (tmp_path / "m_search.md").exists()
    chosen = table["trials"][table["chosen"]]
    assert all(loss <= 3 + 1e-9 for loss in chosen["loss_points"].values())
    assert [t["method"] for t in table["trials"]][0] == "pack" and len(table["trials"]) >= 2
    info = read_metadata(onnx.load(str(out)))
    assert info.method == chosen["method"] and info.fidelity["search"]["max_loss_points"] == 3
    assert table["why"] in text and "chosen:" in table["why"]


def test_auto_without_data_says_why_it_packs(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = [str(shipped(EXAMPLES / f"{n}.onnx")) for n in PAIR] + ["-o", str(out), "--no-latency", "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum("without --calib" in line and "pack" in line for line in out) == 1
    assert main([*argv[:-2], "--objective", "latency"]) == 2
    assert "only with --max-loss" in capsys.readouterr().err


def _command(tmp_path, *extra) -> list[str]:
    argv = [str(shipped(EXAMPLES / f"{n}.onnx")) for n in PAIR] + ["-o", str(tmp_path / "m.onnx"),
                                                                    "--names", ",".join(PAIR)]
    argv += [f"--calib={n}={_calib(n)}" for n in PAIR]
    return argv + ["--max-loss", "3", "--steps", "10", "--no-latency", "-q", *extra]


def _one_input_command(tmp_path, *extra) -> list[str]:
    """The search of two LeNets that take one 28x28 input (MNIST, Fashion-MNIST; tests/models), where
    every method applies: codebook, mtz and zipper, each taken by a process, 10 calibration steps."""
    tasks = {"mnist": "lenet_mnist", "fashion": "lenet_fashion"}
    argv = [str(MODELS / f"{m}.onnx") for m in tasks.values()] + ["-o", str(tmp_path / "m.onnx"), "--names",
                                                                   ",".join(tasks)]
    argv += [f"--calib={t}={MODELS / f'{t}_eval.npz'}" for t in tasks]
    return argv + ["--max-loss", "3", "--steps", "10", "--no-latency", "--time-budget", "15", "-q", *extra]


def test_jobs_search_methods_in_two_processes(tmp_path, capsys):
    """--jobs 2: codebook, mtz and zipper bisected by two worker processes (each starts its first method
    at once; the third may find the 15 s spent); the parent gathers their trials and chooses."""
    assert main([*_one_input_command(tmp_path, "--jobs", "2")]) == 0, capsys.readouterr().err
    table = json.loads((tmp_path / "m_search.json").read_text())
    measured = {t["method"] for t in table["trials"] if t["status"] == "ok"}
    assert {"codebook", "mtz"} <= measured, (measured, table["notes"])


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_ranks_share_the_methods_and_rank0_writes(tmp_path):
    """Under torchrun with two processes, rank 0 searches codebook and zipper (the first and third of
    codebook, mtz, zipper: objective size puts the two that save bytes first) and rank 1 mtz; rank 0's
    report holds both ranks' trials, one baseline, and its choice is the model written."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "onnxmerge",
                          *_one_input_command(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    table = json.loads((tmp_path / "m_search.json").read_text())
    methods = [t["method"] for t in table["trials"]]
    assert methods.count("pack") == 1 and {"codebook", "mtz"} <= set(methods), (methods, table["notes"])
    assert read_metadata(onnx.load(str(tmp_path / "m.onnx"))).method == table["trials"][table["chosen"]]["method"]


def test_loss_is_paired_and_its_standard_error_widens_the_budget(monkeypatch):
    """400 held-out samples; merged and original disagree on 12: the original alone right on 8, the
    merged alone on 4. Loss 1 point; its standard error is the paired one, from the 12 only."""
    from onnxmerge.search import trial as trial_mod

    orig = np.ones(400, bool)
    orig[:10] = False  # the original wrong on 10
    merged = orig.copy()
    merged[10:18] = False  # merged wrong where the original is right (8)
    merged[:4] = True  # merged right where the original is wrong (4)
    monkeypatch.setattr(trial_mod, "correct", lambda model, info, data: {"a": merged})
    setup = type("S", (), {"validation": {}, "original_correct": {"a": orig}})()
    t = Trial("m", {})
    trial_mod._measure(t, setup)
    d = orig.astype(float) - merged
    assert t.loss["a"] == pytest.approx(1.0)
    assert t.error["a"] == pytest.approx(100 * d.std(ddof=1) / 20)  # sqrt(400) = 20
    assert 0.4 < t.error["a"] < 1.0
    assert not t.within(1.0) and t.within(1.0 + trial_mod.CONFIDENCE_Z * t.error["a"])


@pytest.fixture
def fake_compositions(fake_trials, monkeypatch):
    """The fake methods of fake_trials, and zipper+codebook with a knob j on top of zipper's k: its
    loss is zipper's plus j / 4 points, its size zipper's minus 10 j bytes. `offset["zipper"]`: points
    added to every zipper loss."""
    from onnxmerge.passes import METHODS

    method = METHODS[COMPOSED]
    monkeypatch.setitem(METHODS, COMPOSED, type(method)(**{**method.__dict__, "search": Knob(
        lambda n: [{"j": j} for j in range(1, 9)], "j")}))
    fake, offset = search_run.run_trial, {"zipper": 0.0}

    def run_trial(setup, method, params, max_loss, beats=None, warm_start=None, same=None):
        t = fake(setup, method, {k: v for k, v in params.items() if k != "j"}, max_loss, None, warm_start)
        fake_trials[-1] = (method, dict(params), warm_start)
        j = params.get("j", 0)
        t.params, t.bytes = dict(params), t.bytes - 10 * j
        t.loss = {n: v + j / 4 + offset.get(method, 0.0) for n, v in t.loss.items()}
        if beats is not None and not beats(t):
            t.status, t.model, t.loss, t.accuracy = "skipped: cannot beat the best model found so far", None, {}, {}
        return t

    monkeypatch.setattr(search_run, "run_trial", run_trial)
    return offset


COMPOSED = "zipper+codebook"


def test_a_composition_starts_from_its_first_method_s_best_setting(fake_trials, fake_compositions):
    """zipper's best within a budget of 1.5 is k=3 (loss 1); the composition bisects j on k=3 and
    keeps j=2 (loss 1.5), 20 bytes smaller than zipper's best."""
    result = _search_examples(methods=["zipper", COMPOSED], max_loss=1.5)
    tried = [(m, p) for m, p, _ in fake_trials if m != "pack"]
    first = [m for m, _ in tried].index(COMPOSED)
    assert all(m == "zipper" for m, _ in tried[:first])  # the composition after the method it starts from
    assert all(p["k"] == 3 for _, p in tried[first:])
    assert result.chosen.method == COMPOSED and result.chosen.params == {"k": 3, "j": 2}
    # every composition setting starts from zipper's k=3 model (as the search calibrated it)
    start = next(t.model for t in result.trials if t.method == "zipper" and t.params == {"k": 3})
    assert start is not None and all(w is start for m, _, w in fake_trials if m == COMPOSED)


def test_a_composition_runs_right_after_its_first_method(fake_trials, fake_compositions):
    """Its start is at hand, and what it finds prunes the methods after it: zipper, then
    zipper+codebook, then codebook, whose settings cannot beat the composition's j=2 (680 bytes) at
    k <= 3 and so are not calibrated."""
    result = _search_examples(methods=["zipper", "codebook", COMPOSED], max_loss=1.5)
    order = [m for m, _, _ in fake_trials if m != "pack"]
    assert order == sorted(order, key=["zipper", COMPOSED, "codebook"].index)
    assert all(t.status.startswith("skipped") for t in result.trials if t.method == "codebook" and t.params["k"] <= 3)
    assert result.chosen.method == COMPOSED


def test_the_method_a_composition_starts_from_is_not_pruned(fake_trials, fake_compositions):
    """codebook, searched first, finds k=3 (700 bytes); zipper's settings alone cannot beat that, but
    the composition needs zipper's best within the budget measured: zipper is bisected unpruned,
    and the composition on its k=3 wins."""
    result = _search_examples(methods=["codebook", "zipper", COMPOSED], max_loss=1.5)
    zipper = [t for t in result.trials if t.method == "zipper"]
    assert zipper and not any(t.status.startswith("skipped") for t in zipper)
    assert result.chosen.method == COMPOSED and result.chosen.params == {"k": 3, "j": 2}
    fake_trials.clear()
    result = _search_examples(methods=["codebook", "zipper"], max_loss=1.5)  # no composition: pruned as before
    assert any(t.status.startswith("skipped") for t in result.trials if t.method == "zipper")


def test_a_composition_is_not_tried_without_a_start_within_the_budget(fake_trials, fake_compositions):
    fake_compositions["zipper"] = 100.0  # every zipper setting far over the budget
    result = _search_examples(methods=["zipper", COMPOSED], max_loss=1.0)
    assert COMPOSED not in [m for m, _, _ in fake_trials] and result.chosen.method == "pack"
    assert any(n.startswith(f"{COMPOSED} not tried: no zipper setting was measured within the budget")
               for n in result.notes)
    fake_trials.clear()
    result = _search_examples(methods=[COMPOSED], max_loss=1.0)  # zipper not searched: nothing to start from
    assert [m for m, _, _ in fake_trials] == ["pack"] and any(n.startswith(f"{COMPOSED} not tried") for n in result.notes)


def test_a_composition_says_whether_its_first_method_does_not_apply_or_was_not_reached(
        fake_trials, fake_compositions, monkeypatch):
    """zipper refused by the models: the composition does not apply either; zipper not started for
    want of time: the composition was not tried, which is not the same thing."""
    run = search_run.run_trial

    def refusing(setup, method, params, *args, **kwargs):
        if method == "zipper":
            raise MergeError("zipper: the models differ")
        return run(setup, method, params, *args, **kwargs)

    monkeypatch.setattr(search_run, "run_trial", refusing)
    notes = _search_examples(methods=["zipper", COMPOSED], max_loss=1.0).notes
    assert f"{COMPOSED} does not apply: zipper does not" in notes
    monkeypatch.setattr(search_run, "run_trial", run)
    fake_trials.clear()
    notes = _search_examples(methods=["zipper", COMPOSED], max_loss=1.0, time_budget_s=1e-3).notes
    assert f"{COMPOSED} not tried: zipper was not tried (time budget)" in notes
    assert not any(n.startswith(f"{COMPOSED} does not apply") for n in notes)


def test_without_pytorch_candidates_are_judged_as_merged(monkeypatch):
    """A fresh install without torch: the search still runs every method, calibrates nothing and
    says why, instead of dropping the methods whose candidates would be calibrated."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    result = _search_examples(methods=["codebook"], max_loss=1.0, measure_latency=False, time_budget_s=60)
    codebook = [t for t in result.trials if t.method == "codebook"]
    assert codebook and all(t.measured and not t.calibrated for t in codebook)
    assert any(n.startswith("PyTorch is not installed: no candidate was calibrated") for n in result.notes)
    assert not any("does not apply" in n for n in result.notes)


def test_a_setting_the_merge_rounds_to_one_tried_before_is_not_measured_again():
    """zipper rounds --share up to a residual block's end: on the ResNet pair, settings merged as one
    model are measured once; the later one says which it is, and the bisection goes by that outcome."""
    paths = [str(shipped(MODELS / f)) for f in ("resnet_mnist.onnx", "resnet_fashion.onnx")]
    calib = {n: load_dataset(shipped(MODELS / f"{n}_eval.npz")) for n in ("mnist", "fashion")}
    result = search(paths, ["mnist", "fashion"], calib, max_loss=100, methods=["zipper"], progress=False,
                    calibration=CalibrationConfig(steps=0), measure_latency=False, log=lambda line: None)
    zipper = [t for t in result.trials if t.method == "zipper"]
    measured = [t for t in zipper if t.measured]
    assert len({t.effective["share"] for t in measured}) == len(measured)  # each model measured once
    again = [t for t in zipper if t.same_as is not None]
    assert again and all(t.effective == t.same_as.effective and t.status == f"same model as {t.same_as.label}"
                         for t in again)
    assert any("merged as share=" in t.label for t in measured)  # a rounded setting says what it merged
    assert result.chosen.effective["share"] == max(t.effective["share"] for t in zipper)  # budget 100: the most


def test_a_search_calibrates_each_candidate_on_a_smaller_budget_than_a_plain_merge(monkeypatch):
    """Where --steps / --patience are not given: a plain merge or `calibrate` gets CalibrationConfig's
    budget, each candidate of a search a third of it (so that the time budget holds more trials);
    given, they are used as they are."""
    from onnxmerge import cli
    from onnxmerge.search import CANDIDATE_CALIBRATION as candidate

    d = CalibrationConfig()
    assert candidate.steps < d.steps and candidate.patience <= d.patience
    merge_args = ["merge", "a.onnx", "b.onnx", "-o", "m.onnx", "--calib", "a=x.npz"]
    args = cli.build_parser().parse_args(merge_args)
    plain, searching = cli._calib_config(args), cli._calib_config(args, searching=True)
    assert (plain.steps, plain.patience) == (d.steps, d.patience)
    assert (searching.steps, searching.patience) == (candidate.steps, candidate.patience)
    args = cli.build_parser().parse_args(merge_args + ["--steps", "300", "--patience", "2"])
    assert all((c.steps, c.patience) == (300, 2) for c in (cli._calib_config(args), cli._calib_config(args, True)))
    # search() itself, given no calibration settings
    seen = []

    def bisect_method(setup, name, ladder, max_loss, objective, best, *args, **kwargs):
        seen.append(setup.calibration)
        return [], best, True

    monkeypatch.setattr(search_run, "bisect_method", bisect_method)
    _search_examples(methods=["codebook"], max_loss=1.0)
    assert seen == [candidate]


@pytest.mark.parametrize("objective, given, used", [("latency", None, "auto"), ("size", None, "on"),
                                                    ("latency", "off", "off"), ("size", "auto", "auto")])
def test_candidates_are_fused_as_timed_under_objective_latency(fake_trials, monkeypatch, objective, given, used):
    """Under --objective latency each candidate is timed anyway: by default its branches are fused
    as they ran fastest here (--fuse-branches auto); else as a merge fuses them (on), or as given."""
    seen = set()
    real = search_run.run_trial

    def spy(setup, *args, **kwargs):
        seen.add(setup.fuse_branches)
        return real(setup, *args, **kwargs)

    monkeypatch.setattr(search_run, "run_trial", spy)
    _search_examples(methods=["zipper"], max_loss=1.0, objective=objective, fuse_branches=given)
    assert seen == {used}



@pytest.fixture
def scripted_trial(monkeypatch):
    """run_trial with its merge, calibration and measurement replaced: each calibration returns a model
    named for its start and its steps, and the losses measured after it are popped from `losses` (as
    (loss, standard error) of task a); returns (calls, losses, setup)."""
    from onnxmerge.model.contract import MergedInfo
    from onnxmerge.search import trial as trial_mod

    calls, losses = [], []
    merged = type("R", (), {"model": "merged", "info": MergedInfo("1", "zipper", {"share": 2}, []),
                            "state": type("S", (), {"tasks": [type("T", (), {"name": "a", "original": "A"})()]})()})()
    monkeypatch.setattr(trial_mod, "merge", lambda *a, **k: merged)
    monkeypatch.setattr(trial_mod, "parameter_bytes", lambda m: 100)
    monkeypatch.setattr(trial_mod, "count_macs", lambda m: 10)

    def calibrate(model, info, teachers, calib, config, progress=True):
        calls.append((model, teachers, config.steps, config.patience))
        return type("C", (), {"model": f"{model}+{config.steps}", "summary": lambda self: {}})()

    def measure(trial, setup):
        if trial.calibrated:
            trial.loss["a"], trial.error["a"] = losses.pop(0)
        else:
            trial.loss["a"], trial.error["a"] = 3.0, 0.2  # as merged: far over

    monkeypatch.setattr(trial_mod, "calibrate", calibrate)
    monkeypatch.setattr(trial_mod, "_measure", measure)
    setup = trial_mod.Setup([], ["a"], {}, {}, {}, {}, 1000, CalibrationConfig(steps=2000, patience=5), 0.1,
                            measure_latency=False, fuse_branches="off")
    return calls, losses, setup


@pytest.mark.parametrize("first, near", [((1.15, 0.2), True),  # over (1.35 > 1) but 0.95 <= 1: a near miss
                                         ((1.25, 0.2), False),  # 1.05 > 1: not near
                                         ((0.7, 0.2), False)])  # within after its calibration
def test_a_near_miss_is_calibrated_longer_from_its_merge(scripted_trial, first, near):
    """run_trial keeps a near miss's merged model and teachers; calibrate_longer calibrates that
    merge (not the calibrated weights) with three times the steps and twice the patience, as a new
    trial of the same setting that leaves the first as it was."""
    from onnxmerge.search.trial import calibrate_longer, run_trial

    calls, losses, setup = scripted_trial
    losses += [first, (0.6, 0.2)]
    t = run_trial(setup, "zipper", {"share": 2}, 1.0)
    assert calls == [("merged", {"a": "A"}, 2000, 5)] and t.model == "merged+2000" and t.calibrated
    assert t.near(1.0) == (first[0] - first[1] <= 1.0) and t.within(1.0) == (first[0] + first[1] <= 1.0)
    assert (t.merged is not None) == near and t.calibration_seconds >= 0  # a near miss: near, not within
    if not near:
        return
    longer = calibrate_longer(t, setup)
    assert calls[1] == ("merged", {"a": "A"}, 6000, 10)
    assert longer.model == "merged+6000" and longer.loss == {"a": 0.6} and longer.within(1.0)
    assert longer.params == t.params and longer.info is not t.info and longer.seconds == longer.longer > 0
    assert longer.usual_seconds == 0 and t.loss == {"a": first[0]} and t.model == "merged+2000" and not t.longer
    assert (t.row()["calibration_steps"], longer.row()["calibration_steps"]) == (2000, 6000)


@pytest.fixture
def near_at_4(fake_trials, monkeypatch):
    """fake_trials' method, its k=4 (loss 2) a near miss (error 1.5) that calibrate_longer brings to a
    loss of 0.5; returns the list of trials calibrated longer."""
    real, longer = search_run.run_trial, []

    def run_trial(*args, **kwargs):
        trial = real(*args, **kwargs)
        if trial.params.get("k") == 4 and trial.measured:
            trial.error = {n: 1.5 for n in trial.loss}
            trial.merged, trial.calibration_seconds = onnx.ModelProto(), 10.0
        return trial

    def calibrate_longer(near, setup):
        assert near.merged is not None
        longer.append(dataclasses.replace(near, loss={n: 0.5 for n in near.loss}, error={}, merged=None, model=onnx.ModelProto(),
                                          seconds=30.0, longer=30.0))
        return longer[-1]

    monkeypatch.setattr(search_run, "run_trial", run_trial)
    monkeypatch.setattr(search_run, "calibrate_longer", calibrate_longer)
    return longer


def test_the_bisection_ending_on_a_near_miss_calibrates_it_longer_and_goes_on(fake_trials, near_at_4):
    """k=4 (over, a near miss) is where the bisection ends: calibrated longer it is within, so the
    bisection goes on above it (k=5 and up: over, not near) and chooses it."""
    result = _search_examples(methods=["zipper"], max_loss=1.0)
    tried = [p["k"] for m, p, _ in fake_trials if m == "zipper"]
    assert len(near_at_4) == 1 and result.chosen is near_at_4[0] and result.chosen.params == {"k": 4}
    assert near_at_4[0] in result.trials and 5 in tried and max(tried) > 4
    assert all(t.merged is None for t in result.trials)  # nothing kept past the bisection


def test_a_near_miss_is_not_calibrated_longer_past_the_time_budget(fake_trials, near_at_4, monkeypatch):
    """Its longer calibration, taken to last three times its first (3 x 10 s), must end before the
    deadline less the time kept for the methods still to run."""
    _trials_lasting(monkeypatch, {"pack": 1.0, "zipper": 1.0, "codebook": 1.0})
    result = _search_examples(methods=["zipper", "codebook"], max_loss=1.0, objective="latency", time_budget_s=25,
                              measure_latency=False)
    assert not near_at_4 and result.chosen.params == {"k": 3}
    assert "time budget spent: zipper k=4, a near miss, not calibrated longer" in result.notes, result.notes


def test_a_near_miss_s_longer_calibration_is_not_taken_for_a_trial_s_usual_length(fake_trials, monkeypatch):
    """A trial of 350 s that is a near miss's longer calibration is not taken as the length of the next
    trial (a longer calibration runs only where it fits): zipper bisects on, where 350 s trials stop it
    after one (test_every_later_method_is_kept_the_time_of_one_trial)."""
    real = search_run.run_trial

    def longer(*args, **kwargs):
        trial = real(*args, **kwargs)
        if trial.method == "zipper":
            trial.seconds, trial.longer = 350.0, 350.0
        return trial

    monkeypatch.setattr(search_run, "run_trial", longer)
    result = _search_examples(methods=["zipper", "codebook"], max_loss=1.0, objective="latency", time_budget_s=600,
                              measure_latency=False)
    tried = [m for m, _, _ in fake_trials]
    assert tried.count("zipper") >= 3 and "codebook" in tried, tried
    assert result.chosen.params == {"k": 3}
