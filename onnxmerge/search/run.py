"""The search itself: the baseline, then each method's knob bisected (see onnxmerge.search)."""


from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from onnxmerge.api import for_runtime, merge
from onnxmerge.calibration.calibrate import CalibrationConfig
from onnxmerge.errors import MergeError, UsageError
from onnxmerge.measure.metrics import parameter_bytes
from onnxmerge.model.contract import write_metadata
from onnxmerge.model.saving import save_atomic
from onnxmerge.passes import BASELINE, METHODS
from onnxmerge.pipeline.checks import validate_output
from onnxmerge.pipeline.manager import FUSE_MODES
from onnxmerge.search import CANDIDATE_CALIBRATION, DEFAULT_MAX_LOSS, DEFAULT_TIME_BUDGET_S, OBJECTIVES
from onnxmerge.search.front import beats, choose, pareto
from onnxmerge.search.trial import LONGER, Setup, Trial, calibrate_longer, correct, run_trial, setting_text

HELD_OUT_FRACTION, HELD_OUT_MAX = 0.2, 2000  # of --calib, per task, when no --validation is given
HELD_OUT_SEED = 0
# the time kept for each method still to run: its trial taken to last this much longer than the
# longest so far, for the spread of trial times (budget suite's ResNet tuning pair: the trials before
# codebook each ran 5-8 s past the longest before them, and its kept time ran 13 s short)
KEPT_SPREAD = 1.25


@dataclass
class SearchResult:
    trials: list[Trial]
    chosen: Trial
    max_loss: float
    objective: str
    original_accuracy: dict[str, float]
    original_bytes: int
    validation: dict[str, str]  # task -> where its held-out data came from
    originals: dict  # task -> path or ModelProto, as the merge compared with them
    seconds: float
    notes: list[str] = field(default_factory=list)

    def front(self, objective: str | None = None) -> list[Trial]:
        return pareto(self.trials, objective or self.objective)


@dataclass
class Paused:
    """A bisection stopped to keep time for the methods after it: the settings it had left (between
    its last within the budget and its first over it), its start and warm start, whether it prunes,
    and the note that said so."""

    name: str
    ladder: list[dict]
    start: object
    warm: object
    prune: bool
    note: str


def split_validation(calib: dict, validation: dict | None, seed: int = HELD_OUT_SEED) -> tuple[dict, dict, dict]:
    """(calibration data, validation data, where each task's validation data came from): `validation`
    where given, else a held-out part of `calib` (a fifth, at most HELD_OUT_MAX samples)."""
    train, held, where = {}, {}, {}
    for task, ds in calib.items():
        given = (validation or {}).get(task)
        if given is not None:
            train[task], held[task], where[task] = ds, given, f"--validation {given.source}"
        elif not len(ds):
            raise MergeError(f"--calib: data {ds.source} has no samples (task {task!r})")
        else:
            n = min(HELD_OUT_MAX, max(1, int(len(ds) * HELD_OUT_FRACTION)))
            if len(ds) - n < 1:
                raise UsageError(f"{ds.source}: {len(ds)} sample(s) cannot be split into calibration and "
                                 f"held-out validation data for task {task!r}: give more, or --validation")
            train[task], held[task] = ds.split(n, seed)
            where[task] = f"{n} of the {len(ds)} samples of --calib {ds.source}, held out"
        if held[task].y is None:
            raise UsageError(f"{held[task].source}: no labels: --max-loss measures accuracy on held-out data "
                             f"of task {task!r} (give labelled --calib or --validation data)")
    return train, held, where


def search(inputs: list, names: list[str] | None, calib: dict, *, validation: dict | None = None,
           max_loss: float = DEFAULT_MAX_LOSS, objective: str = "size", time_budget_s: float = DEFAULT_TIME_BUDGET_S,
           methods: list[str] | None = None, params: dict | None = None, calibration: CalibrationConfig | None = None,
           latency_budget_s: float = 0.3, measure_latency: bool = True, jobs: int = 1, progress: bool = True,
           log=None, fuse_branches: str | None = None) -> SearchResult:
    """Search `methods` (default: every method with a search knob) for the model with the lowest
    `objective` cost whose every task loses at most `max_loss` points on held-out data. `params`:
    fixed parameters of the searched methods (not the knob's). `calibration`: how each candidate
    that is over the budget as merged is calibrated (default CANDIDATE_CALIBRATION: 2000 steps,
    patience 5, a third of a plain merge's budget). `log(line)`: where each trial's line goes
    (default: printed above the progress bar). `fuse_branches`: as api.merge's, for each candidate
    (fused after its calibration; its latency measured fused); default auto under objective latency
    (the candidates are timed anyway: each is fused as it runs fastest here), else on.

    Methods are independent: `jobs` > 1 bisects up to that many methods at once in worker processes
    (each then prunes against the baseline and its own finds only); under torchrun each process
    takes every WORLD_SIZE-th method and rank 0 gathers every trial (the others return their own)."""
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective}: choose from {', '.join(OBJECTIVES)}")
    if not max_loss >= 0:
        raise UsageError(f"--max-loss {max_loss}: give the points of accuracy each task may lose (>= 0)")
    if not time_budget_s > 0:
        raise UsageError(f"--time-budget {time_budget_s}: give seconds (> 0)")
    if not jobs >= 1:
        raise UsageError(f"--jobs {jobs}: give a number of processes (>= 1)")
    fuse_branches = fuse_branches or ("auto" if objective == "latency" else "on")
    if fuse_branches not in FUSE_MODES:
        raise UsageError(f"--fuse-branches {fuse_branches}: choose from {', '.join(FUSE_MODES)}")
    if not calib:
        raise UsageError("--max-loss needs labelled data per task to measure accuracy on: give --calib TASK=PATH")
    chosen = [METHODS[m] for m in (methods or [m for m in METHODS if METHODS[m].search])]
    searched = sorted((m for m in chosen if not m.composes), key=lambda m: _strength(m, objective))  # stable
    # a composition after the methods it composes (its first method's best setting is its start)
    compositions = [m for m in chosen if m.composes and m.composes[0] in {s.name for s in searched}]
    notes = [f"{m.name} not tried: it starts from {m.composes[0]}'s best setting, and {m.composes[0]} is not searched"
             for m in chosen if m.composes and m not in compositions]
    for m in chosen:
        if m.search is None:
            raise UsageError(f"method {m.name} has no setting to search: merge with it directly, without --max-loss")
        ladders = [m.search, *(METHODS[c].search for c in (m.composes or ()))]
        clash = sorted({k for knob in ladders if knob for p in knob.ladder(2) for k in p} & set(params or {}))
        if clash:
            raise UsageError(f"--max-loss searches {', '.join('--' + k.replace('_', '-') for k in clash)} of "
                             f"method {m.name}: leave it out")
    start = time.perf_counter()
    deadline = time.time() + time_budget_s  # wall-clock: worker processes compare with it too
    train, held, where = split_validation(calib, validation)
    bar = tqdm(total=int(time_budget_s), unit="s", desc="search", disable=not progress,
               bar_format="{desc}: {n_fmt}/{total_fmt} s of the time budget |{bar}| {postfix}")
    say = log or (lambda line: tqdm.write(line) if progress else print(line))

    # the baseline: every task's reference accuracy, the originals' size, the always-valid answer
    # (merge checks the data against the tasks' inputs, in the words of a plain merge)
    base = merge(inputs, method=BASELINE, names=names, calib=train, validation=held, calibrate_last=False)
    names = [t.name for t in base.state.tasks]
    missing = [t for t in names if t not in calib]
    if missing:
        raise UsageError(f"--max-loss: no --calib data for task(s) {', '.join(missing)}")
    originals = {t.name: t.original if t.modernised else str(t.path) for t in base.state.tasks}
    original_bytes = sum(parameter_bytes(t.original) for t in base.state.tasks)
    if not base.state.shared_input:  # known now: not worth a trial each, nor the time kept for one
        notes += [f"{m.name} does not apply: it shares computation on one input, and these models take inputs "
                  "of different shapes or types" for m in searched + compositions if m.one_input]
        searched = [m for m in searched if not m.one_input]
        compositions = [m for m in compositions if not m.one_input]
    n_layers = min(len(t.layers) for t in base.state.tasks)
    # the originals' answers on the held-out data, from pack: it computes them exactly (checked by merge)
    original_correct = correct(base.model, base.info, held)
    calibration = calibration or CANDIDATE_CALIBRATION
    from_calib = [t for t in names if not where[t].startswith("--validation")]
    if from_calib:  # the usual case of a user who calibrates on the models' training data
        notes.append(f"validation of {', '.join(from_calib)}: held out of --calib; if the models trained on these "
                     "samples, they know them better than unseen data, and losses read high (about 1.5 times the "
                     "test-split loss on the budget suite, README \"Held-out data\"): give --validation data they "
                     "did not train on")
    if importlib.util.find_spec("torch") is None:  # candidates are judged as merged, none calibrated
        calibration = dataclasses.replace(calibration, steps=0)
        notes.append("PyTorch is not installed: no candidate was calibrated, each was judged as merged "
                     "(pip install torch==2.13.0, the CPU build, to calibrate them)")
    setup = Setup(inputs, names, train, held, originals, original_correct, original_bytes,
                  calibration, latency_budget_s, measure_latency, fuse_branches)
    del base
    say(f"search: {', '.join(m.name for m in searched + compositions)} within {max_loss:g} point(s) per task, objective "
        f"{objective}; validation: " + "; ".join(f"{t}: {w}" for t, w in where.items()))
    trials = []
    refused = set()  # methods whose first trial was refused: they do not apply to these models

    def record(trial: Trial) -> Trial:
        trials.append(trial)
        say(f"[{len(trials):2d}] " + _line(trial, setup.original_bytes, max_loss))
        bar.n = min(int(time.perf_counter() - start), bar.total)
        bar.set_postfix_str(f"{len(trials)} trial(s)")
        return trial

    best = record(run_trial(setup, BASELINE, {}, max_loss))  # the best model within the budget so far
    if max_loss == 0:  # nothing lossy can be within it: the originals, exactly
        notes.append("a budget of 0 points keeps every task exactly as its original: pack, no lossy method tried")
        searched, compositions = [], []
    rank, world = _rank_world()
    mine = [m.name for m in searched][rank::world]  # under torchrun, each process takes a share of the methods
    # a method a composition starts from is bisected without pruning: the composition needs its best
    # setting within the budget measured, even where that alone cannot beat the best model so far
    starts = {c.composes[0] for c in compositions}
    work = [(setup, name, [{**(params or {}), **p} for p in METHODS[name].search.ladder(n_layers)], max_loss,
             objective, best, deadline, name not in starts) for name in mine]

    # every method still to run is kept the time of one trial (the longest so far, and a quarter more
    # for the spread of trial times: KEPT_SPREAD): the methods before it bisect only as long as they
    # leave that, so a slow method tried first cannot leave a later one untried (codebook, tried last
    # under --objective latency, once never ran: README "Time kept")
    pending = list(mine)  # methods whose bisection has not started
    paused: list[Paused] = []  # bisections stopped for that time, gone on with at the end

    def kept() -> tuple[float, list[str]]:
        return len(pending) * KEPT_SPREAD * max(t.usual_seconds for t in trials), pending

    def compose(comp) -> None:
        """Bisect composition `comp`'s knob on its first method's best setting within the budget."""
        nonlocal best
        if not any(t.method == comp.composes[0] for t in trials):
            notes.append(f"{comp.name} does not apply: {comp.composes[0]} does not" if comp.composes[0] in refused else
                         f"{comp.name} not tried: {comp.composes[0]} was not tried (time budget)")
            return
        first = [t for t in trials if t.method == comp.composes[0] and t.within(max_loss)]
        if not first:
            notes.append(f"{comp.name} not tried: no {comp.composes[0]} setting was measured within the budget "
                         "(each one tried was over it)")
            return
        start_from = choose(first, max_loss, objective)
        best = choose([t for t in trials if t.within(max_loss)], max_loss, objective)
        ladder = [{**(params or {}), **start_from.params, **start_from.effective, **p}
                  for p in comp.search.ladder(n_layers)]
        # from the first method's model as calibrated (its shared layers' averages corrected), so that
        # the second's loss adds to a recovered one, not to the raw merge's (issue 18)
        warm = start_from.model if comp.warm else None
        if comp.warm and warm is None:
            notes.append(f"{comp.name} started from a fresh {comp.composes[0]} merge: the model of "
                         f"{start_from.label} was not kept")
        elif warm is not None:
            notes.append(f"{comp.name} started from {start_from.label} as the search "
                         f"{'calibrated' if start_from.calibrated else 'merged'} it")
        found_notes, best, _ = bisect_method(setup, comp.name, ladder, max_loss, objective, best, deadline,
                                             on_trial=record, guess=max(t.usual_seconds for t in trials), start=warm,
                                             kept=kept, first_kept=False, paused=paused)
        notes.extend(found_notes)

    # a composition runs where its first method was searched (under torchrun: by this process)
    composed_here = [c for c in compositions if c.composes[0] in mine]
    if jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(min(jobs, len(work)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for job, (found, found_notes, applies) in zip(work, pool.map(_bisect_printing, work)):
                for t in found:
                    record(t)
                notes += found_notes
                if not applies:
                    refused.add(job[1])
        pending.clear()  # the methods ran side by side: the compositions keep nothing back
        for comp in composed_here:
            compose(comp)
    else:
        for job in work:  # each method prunes against what the methods before it found
            pending.remove(job[1])
            found_notes, best, applies = bisect_method(*job[:5], best, deadline, on_trial=record, prune=job[7],
                                                       guess=max(t.usual_seconds for t in trials), kept=kept,
                                                       paused=paused)
            notes += found_notes
            if not applies:
                refused.add(job[1])
            # a composition right after its first method: its start is at hand, and what it finds
            # prunes the methods after it (it beats its first method on bytes at the same latency)
            for comp in composed_here:
                if comp.composes[0] == job[1]:
                    compose(comp)
        # the time kept for the methods after a paused bisection, where they did not use it, goes back
        # to it, in the order they paused (the VGG report pair once ended at 403 s of 600 with its
        # composition's least aggressive setting untried: README "Time kept")
        for p in paused:
            notes.remove(p.note)
            found_notes, best, _ = bisect_method(setup, p.name, p.ladder, max_loss, objective, best, deadline,
                                                 on_trial=record, prune=p.prune, start=p.start, warm_from=p.warm,
                                                 guess=max(t.usual_seconds for t in trials))
            notes.extend(found_notes)
    if world > 1:
        trials, notes = _gather(trials, notes, rank, world)
    bar.n = min(int(time.perf_counter() - start), bar.total)
    bar.close()
    within = [t for t in trials if t.within(max_loss) and t.model is not None]
    return SearchResult(trials, choose(within, max_loss, objective), max_loss, objective, setup.original_accuracy,
                        original_bytes, where, originals, time.perf_counter() - start, notes)


def _strength(method, objective: str) -> int:
    """Where `objective` stands among what the method's knob saves (0: its first strength; a knob
    that does not save it at all after every knob that does)."""
    saves = method.search.saves if method.search else ()
    return saves.index(objective) if objective in saves else len(OBJECTIVES)


def bisect_method(setup: Setup, name: str, ladder: list[dict], max_loss: float, objective: str, best: Trial,
                  deadline: float, on_trial, prune: bool = True, guess: float = 0.0,
                  start=None, kept=None, first_kept: bool = True, paused: list | None = None,
                  warm_from=None) -> tuple[list[str], Trial, bool]:
    """Bisect one method's ladder for its most aggressive setting within the budget; `best`: the best
    model within the budget found before (with `prune`, settings that cannot beat it are not calibrated);
    `on_trial(trial)` receives each trial; `guess`: the seconds a trial is taken to last before this
    method has run one (the longest trial of the methods before it); `start`: the earlier merged model
    every setting starts from (a composition's first method's); returns the notes, the best model
    now and whether the method applies to the models (False: its first trial was refused). Only
    the models of this method's best setting and of the warm start are kept (a big pair's
    candidates would not all fit in memory). `kept()`: (seconds, method names) of the time kept for
    the methods after this one; no trial starts that could end in it, but for this method's first
    with `first_kept` (a method's first trial is what the methods before it kept for it). A setting
    that the merge rounds to one tried before (Trial.effective) is not measured again: that trial's
    outcome steers the bisection. Where the bisection ends on a near miss (Trial.near), it is
    calibrated longer (trial.calibrate_longer) if that fits the budget and the time kept, and the
    bisection goes on above it if it is then within the budget. Where it stops for the time kept
    (not for the deadline), `paused` (if given) gets a Paused to go on from once the methods after it
    are done; `warm_from`: the warm start a paused bisection had (a sweep's last model within the budget)."""
    method, notes, tried, applies = METHODS[name], [], [], True
    lo, hi, warm = -1, len(ladder), warm_from  # lo: within the budget (or not worth trying); hi: over it
    outcomes = {}  # ladder index -> the trial whose outcome steers the bisection there

    def forget() -> None:  # the models no later step needs (a near miss's merge: only at the frontier)
        for t in tried:
            if t is not best and t.model is not warm:
                t.model = None
            if t is not outcomes.get(hi):
                t.merged = t.teachers = None

    while True:
        stopped = False
        while hi - lo > 1:
            # a trial started now must end within the budget: this method's longest trial so far is the guess
            # (calibration, which dominates, runs to the same step budget each time); before its first, the
            # longest of the methods before it (a method's first trial once ran 48 s past a 600 s budget)
            ran = [t.usual_seconds for t in tried if t.measured]
            now = time.time()
            keep, later = kept() if kept and (tried or not first_kept) else (0.0, [])
            # the time kept for later methods is judged by the longest trial of any method: a method's own may
            # all have been quick (kept as merged) until one is calibrated (on the ResNet tuning pair a
            # composition's 49 s trials were followed by one of 113 s, and codebook's kept time was gone)
            past = now + max(ran, default=guess) > deadline
            spent = ("time budget spent" if past else
                     f"time budget spent but for a trial of each of {', '.join(later)}"
                     if keep and now + max([*ran, guess]) > deadline - keep else None)
            if spent:
                notes.append(f"{spent}: {name} settings {', '.join(setting_text(p) for p in ladder[lo + 1:hi])} "
                             "not tried")
                if paused is not None and not past:  # stopped for the time kept: it may get it back
                    paused.append(Paused(name, ladder[lo + 1:hi], start, warm, prune, notes[-1]))
                stopped = True
                break
            mid = (lo + hi) // 2
            try:
                worth = (lambda t: beats(t, best, objective)) if prune else None
                # a composition's every setting from its fixed start; a sweep's from its last within the budget
                start_here = warm if start is None and method.sweep and method.sweep in ladder[mid] else start
                trial = run_trial(setup, name, ladder[mid], max_loss, worth, start_here, same=lambda eff: next(
                    (t for t in reversed(tried) if t.measured and t.effective == eff), None))
            except (MergeError, UsageError) as e:
                if not tried:  # its first trial: the method does not apply to these models
                    notes.append(f"{name} does not apply: {e}")
                    applies, stopped = False, True
                    break
                trial = Trial(name, ladder[mid], status=f"failed: {e}")
            tried.append(trial)
            on_trial(trial)
            outcome = outcomes[mid] = trial.same_as or trial  # a setting the merge rounded to one tried before
            if outcome.status.startswith("skipped") or outcome.within(max_loss):
                lo = mid  # only more aggressive settings can do better
                if outcome.within(max_loss):
                    warm = outcome.model
                    best = choose([best, outcome], max_loss, objective)
            else:
                hi = mid
            forget()
        # the bisection ends on a near miss (the least aggressive setting over the budget, by less than a
        # standard error): calibrated longer where that fits, and bisected on above it if then within
        near = outcomes.get(hi)
        if stopped or near is None or near.merged is None:
            break
        if time.time() + LONGER * near.calibration_seconds > deadline - (kept()[0] if kept else 0.0):
            notes.append(f"time budget spent: {near.label}, a near miss, not calibrated longer")
            break
        trial = calibrate_longer(near, setup)
        tried.append(trial)
        on_trial(trial)
        if not trial.within(max_loss):
            break
        outcomes[hi], lo, warm = trial, hi, trial.model
        best = choose([best, trial], max_loss, objective)
        hi = min((i for i, t in outcomes.items() if i > lo and not (t.status.startswith("skipped")
                                                                   or t.within(max_loss))), default=len(ladder))
        forget()
    for t in tried:
        t.merged = t.teachers = None
    return notes, best, applies


def _bisect_printing(job: tuple) -> tuple[list[Trial], list[str], bool]:
    """bisect_method in a worker process (--jobs): each trial's line printed as it ends, the trials
    returned to the parent."""
    found = []
    setup, max_loss = job[0], job[3]

    def on_trial(t: Trial) -> None:
        found.append(t)
        print(f"[{t.method}] " + _line(t, setup.original_bytes, max_loss), flush=True)

    notes, _, applies = bisect_method(*job[:7], on_trial=on_trial, prune=job[7])
    for t in found:
        if not t.within(max_loss):
            t.model = None
    return found, notes, applies


def _rank_world() -> tuple[int, int]:
    """This process's rank and the number of processes under torchrun (RANK, WORLD_SIZE), else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _gather(trials: list[Trial], notes: list[str], rank: int, world: int) -> tuple[list[Trial], list[str]]:
    """Every process's trials and notes at rank 0 (gloo, started only now: calibration inside the
    trials must not take part in a process group), each baseline after the first dropped."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    for t in trials:  # (a rank other than 0 keeps its baseline: it is its own answer, not sent)
        if not t.within(float("inf")):
            t.model = None
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((trials[1:] if rank else trials, notes), gathered, dst=0)
    dist.destroy_process_group()
    if rank:
        return trials, notes
    return [t for got, _ in gathered for t in got], [n for _, got in gathered for n in got]


def save(result: SearchResult, output: str | Path, target_opset: int | None = None) -> Path:
    """Write the chosen model atomically, its metadata noting the search (budget, objective, its
    held-out loss per task); a calibrated choice is checked as merge checks its output.
    `target_opset`: taken down to that opset first (onnxmerge.api.for_runtime)."""
    t = result.chosen
    t.info.fidelity["search"] = {"max_loss_points": result.max_loss, "objective": result.objective,
                                 "validation_loss_points": t.loss, "trials": len(result.trials)}
    if target_opset is not None:
        t.model = for_runtime(t.model, t.info, target_opset, str(output))
    if t.calibrated:
        t.info.fidelity["output_check"] = validate_output(t.model, t.info, result.originals, where=str(output))
    write_metadata(t.model, t.info)
    return save_atomic(t.model, output)


def _line(t: Trial, original_bytes: int | None, max_loss: float) -> str:
    """One trial as one line of the search's log."""
    head = f"{t.method:<8} {t.setting:<28}"
    if not t.measured:
        return f"{head} {t.status}"
    size = f"{original_bytes / t.bytes:5.2f}x smaller" if t.bytes and original_bytes else f"{t.bytes:,} bytes"
    speed = f"{t.speedup:5.2f}x faster" if t.speedup else "  (no latency)"
    acc = "  ".join(f"{task} {100 * a:.1f}% ({-t.loss[task]:+.1f}±{t.error.get(task, 0):.1f})" for task, a in t.accuracy.items())
    verdict = "within budget" if t.within(max_loss) else f"over {max_loss:g}"
    how = "as merged" if not t.calibrated else "calibrated longer (a near miss)" if t.longer else "calibrated"
    return f"{head} {size}  {speed}  {acc}  {how}, {verdict} ({t.seconds:.0f} s)"
