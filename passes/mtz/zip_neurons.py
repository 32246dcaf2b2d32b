"""ZipNeuronsPass: Multi-Task Zipping, Hessian-guided neuron sharing (the `mtz` method).

He, Zhou, Thiele, "Multi-Task Zipping via Layer-wise Neuron Sharing" (NeurIPS 2018), Algorithm 1.
For each model after the first (q = 1, 2, ...; the models before it act as one model whose Hessian
is the sum of theirs: the authors' `merge_new_task`), layer by layer in topological order:

1. the layer-wise Hessians (eqs. 7-8) of both sides over the layer's inputs that they already share
   (bias as a constant extra input), from each task's calibration data run through the current
   zipped network (onnxmerge.passes.mtz._hessian.layer_rows / HessianAccumulator);
2. the functional difference of every neuron pair (eq. 12) as one matrix expression
   (_hessian.PairCosts), and the N_l pairs to share: N_l from `share_ratio`, per-layer counts, or all
   pairs under `threshold`; paired greedily by cost (the authors' code) or by optimal assignment
   (both totals are reported);
3. each shared neuron's incoming weights from shared inputs are the minimiser of eq. 6 (eqs. 10-11);
   its weights from task-specific inputs are kept; the next layers' inputs follow the new column
   order (onnxmerge.passes.mtz._zipped.ZippedNet.relayout);
4. `retrain_steps` steps of calibration (onnxmerge.calibration.calibrate: the tasks' losses and distillation
   from the originals; a step is one batch of every task) re-boost the tasks before the next layer.

A merged mtz model given as the first input stands for its tasks: its network is rebuilt from the
layout in its metadata (onnxmerge.passes.mtz._zipped.ZippedNet.resume) and the other models are zipped into it
from q = its number of tasks on, exactly as in one run of all the models.

A residual space (a block's output and its skip input) is decided at its first producer; its later
producers are merged at their own turn, with the pairs already fixed. Task heads are never shared.
Pruned models (3.6): a merged weight keeps the union of the two nonzero masks, and retraining keeps
the mask. Sharing nothing reproduces the originals exactly.

A depthwise layer follows the pairing of the space it reads (ZippedNet.depthwise: a shared
channel's kernel is the mean of its tasks'), so MobileNet-style networks are zipped through.
Nodes that cannot be zipped are declined (ZippedNet.declined): they and what follows them run per
task; the report has a note per declined node and the figure mtz_declined. Only zipped layers reach
the Hessians and pair costs (ZLayer.source: a zipped layer's index in each task's layer list). A
merged model with declined nodes cannot take further tasks (resume refuses it).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.errors import MergeError, UsageError
from onnxmerge.graph.alignment import Alignment
from onnxmerge.graph.layers import layer_label
from onnxmerge.model.contract import MergedInfo, TaskInfo
from onnxmerge.model.runtime import session
from onnxmerge.passes.mtz import _hessian
from onnxmerge.passes.mtz._zipped import ZippedNet, ZLayer
from onnxmerge.pipeline.manager import Pass, PassResult
from onnxmerge.pipeline.state import MergeState

KEEP_BYTES = 4 << 30  # layer inputs kept for the next layers, at most (_LayerInputs)
HESSIAN_ROWS = 65536  # input rows per task a conv layer's Hessian is estimated from (uniformly subsampled)
SPARSE = 0.25  # a layer whose weights are at least this fraction of zeros is treated as pruned (3.6)
PAIRINGS = ("optimal", "greedy", "random")
MAX_NOTES = 5  # declined nodes noted one by one; the rest in one note


def parse_counts(text: str) -> dict[str, int]:
    """--layer-share 'fc1=300,conv2=12' -> {'fc1': 300, 'conv2': 12}."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"([A-Za-z0-9_./-]+)=(\d+)", item)
        if not m:
            raise UsageError(f"--layer-share {item!r}: write LAYER=COUNT, e.g. fc1=300,conv2=12")
        out[m.group(1)] = int(m.group(2))
    return out


class ZipNeuronsPass(Pass):
    exact = False
    requires = ("aligned", "combined")
    reuse_activations = True  # _LayerInputs; off only to check it against computing every input afresh

    def __init__(self, share_ratio: float = 1.0, counts: dict[str, int] | None = None,
                 threshold: float | None = None, alpha: float = 1.0, hessian_samples: int = 256,
                 retrain_steps: int = 0, pairing: str = "optimal", damping: float = 1e-2, seed: int = 0,
                 tolerance: float | None = None):
        if not 0.0 <= share_ratio <= 1.0:
            raise UsageError(f"--share-ratio {share_ratio}: give a fraction between 0 and 1")
        if threshold is not None and threshold < 0:
            raise UsageError(f"--threshold {threshold}: give a cost >= 0")
        if alpha <= 0:
            raise UsageError(f"--alpha {alpha}: give a weight > 0")
        if pairing not in PAIRINGS:
            raise UsageError(f"--pairing {pairing}: choose from {', '.join(PAIRINGS)}")
        self.share_ratio, self.counts, self.threshold = share_ratio, dict(counts or {}), threshold
        self.alpha, self.hessian_samples, self.retrain_steps = alpha, hessian_samples, retrain_steps
        if tolerance is not None and tolerance < 0:
            raise UsageError(f"--tolerance {tolerance}: give accuracy points >= 0")
        self.pairing, self.damping, self.seed, self.tolerance = pairing, damping, seed, tolerance

    def call(self, state: MergeState) -> PassResult:
        if not state.shared_input:
            raise UsageError("mtz shares neurons of models that take one input: the models' inputs must have the "
                             "same shape and type (and --separate-inputs must not be given)")
        input_name = state.tasks[0].input_map[state.tasks[0].graph.inputs[0].name]
        net, start = self._net(state, input_name)
        zippable = [zl for zl in net.layers if not net.spaces[zl.out_space].head]
        missing = [t.name for t in state.tasks if t.name not in state.calib]
        if missing and zippable and self._shares_anything():
            base = state.base.names if state.base else []
            of = f" (the merged side's Hessians sum those of {state.base.path}'s tasks)" if set(missing) & set(base) else ""
            raise UsageError(f"mtz computes its layer-wise Hessians from calibration data: give --calib TASK=PATH for "
                             f"{', '.join(missing)}{of}")
        first = state.tasks[0 if state.base is None else start]  # a task whose graph is of the architecture
        labels = {zl.index: layer_label(first.layers, zl.source) for zl in net.layers}
        known = {layer_label(first.layers, i) for i in range(len(first.layers))}  # declined layers too
        unknown = set(self.counts) - known - {l.node for l in first.layers}
        if unknown:
            raise UsageError(f"--layer-share: no layer {', '.join(sorted(unknown))} (layers: {', '.join(labels.values())})")
        for zl in net.layers:
            if zl.zeros >= SPARSE:  # a pruned model: merged weights keep the union of the masks (3.6)
                zl.mask = zl.weight != 0
        self.rng = np.random.default_rng(self.seed)
        report: list[dict] = []
        zipper = _Zipper(self, state, net)
        for q in range(start, len(state.tasks)):
            report += zipper.merge_task(q, labels)
        self.net = net  # for tests and tools that look at the zipped network
        model = net.build()
        onnx.checker.check_model(model)
        state.graph = gs.import_onnx(model)
        state.layout = net.layout()  # of the model just built: its initializers are the file's
        for task in state.tasks:
            task.layer_map = {}  # a shared neuron stands for no single original channel
        state.figures["mtz"] = {"layers": report, **zipper.summary(),
                                "depthwise_following_pairing": [dl.node for dl in net.depthwise]}
        _report_declined(state, net, zippable)
        if state.base:
            merged = state.base.names
            state.figures["mtz"]["added_to"] = {"model": str(state.base.path), "tasks": merged}
            state.notes.append(f"tasks {', '.join(merged)} come from {state.base.path}: their originals (the teachers "
                               "of retraining, the reference of the fidelity figures and of --tolerance) are that "
                               "model's sub-models, not their original models")
        state.calibrated = True  # --calib fed the Hessians and the retraining: no calibration after the merge
        return PassResult(state, True)

    def _net(self, state: MergeState, input_name: str) -> tuple[ZippedNet, int]:
        """The zipped network to start from and the first task to zip into it: all tasks unshared
        and task 1; or, where the first input is a merged mtz model (state.base), its network rebuilt
        from its layout with the other models added, and the first of them (merge_new_task)."""
        tasks = state.tasks
        if state.base is None:
            net = ZippedNet([t.name for t in tasks], [t.graph for t in tasks], [t.layers for t in tasks], input_name,
                            [t.output_map for t in tasks], state.opset, state.ir_version)
            return net, 1
        start = len(state.base.names)
        added = tasks[start:]
        try:
            net = ZippedNet.resume(state.base.info.layout, state.base.model, str(state.base.path), str(added[0].path),
                                   [t.name for t in tasks], [t.graph for t in added], [t.layers for t in added],
                                   input_name, [t.output_map for t in tasks], state.opset, state.ir_version)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a layout of the wrong form
            raise MergeError(f"{state.base.path}: its layout (onnxmerge.layout) is corrupt "
                             f"({type(e).__name__}: {str(e)[:120]})") from None
        # one architecture (the layout's fingerprint matched): the identity alignment, as a one-run merge
        # records it, not that of the merged tasks' sub-models, whose layers are the zipped runs
        arch = added[0].layers
        state.alignments = [Alignment.of(tasks[0].name, arch, t.name, arch, [(i, i) for i in range(len(arch))],
                                         "identity") for t in tasks[1:]]
        return net, start

    def _shares_anything(self) -> bool:
        return self.share_ratio > 0 or any(self.counts.values()) or self.threshold is not None

    def count(self, label: str, node: str, n_p: int, n_q: int) -> int | None:
        """N_l: the layer's count, else the share ratio of the smaller side; None: use the threshold."""
        if label in self.counts or node in self.counts:
            n = self.counts.get(label, self.counts.get(node))
            if n > min(n_p, n_q):
                raise UsageError(f"--layer-share {label}={n}: the layer has {min(n_p, n_q)} neurons to pair")
            return n
        if self.threshold is not None:
            return None
        return int(round(self.share_ratio * min(n_p, n_q)))


class _Zipper:
    """Runs Algorithm 1 for one merge step at a time on a ZippedNet."""

    def __init__(self, opts: ZipNeuronsPass, state: MergeState, net: ZippedNet):
        self.opts, self.state, self.net = opts, state, net
        self.calib, self.validation = dict(state.calib), {}
        if opts.tolerance is not None:  # adaptive: each task's accuracy on labelled held-out samples
            for task in state.tasks:
                ds, flag = state.validation.get(task.name), "--validation"
                if ds is None:  # hold out samples of --calib: the originals may have been trained on them
                    ds, flag = state.calib.get(task.name), "--calib"
                if ds is None or ds.y is None:
                    raise UsageError(f"mtz --tolerance measures accuracy: task {task.name}'s {flag} data needs labels")
                if flag == "--validation":
                    self.validation[task.name] = ds
                else:
                    self.calib[task.name], self.validation[task.name] = ds.split(min(1000, len(ds) // 5), opts.seed)
            self.reference = self.accuracy(originals=True)
        self.data = {t: self.calib[task.name].subset(opts.hessian_samples, seed=opts.seed).x
                     for t, task in enumerate(state.tasks) if task.name in self.calib}
        # without retraining, a layer's input, once computed, stays valid for the rest of a merge step
        self.inputs = _LayerInputs(net, self.data, reuse=opts.retrain_steps == 0 and opts.reuse_activations)
        self.trials = 0
        self.retrain_history: list[dict] = []
        self.seconds = 0.0
        self.spent: dict[str, float] = {}  # wall seconds per stage, for the report

    @contextlib.contextmanager
    def timer(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent[stage] = self.spent.get(stage, 0.0) + time.perf_counter() - start

    def merge_task(self, q: int, labels: dict[int, str]) -> list[dict]:
        net, opts = self.net, self.opts
        side_p = frozenset(range(q))
        self.inputs.reset()  # the previous step re-laid out every space
        rows = []
        from tqdm import tqdm

        layers = [zl.index for zl in net.layers if not net.spaces[zl.out_space].head]
        for index in tqdm(layers, desc=f"mtz {self.state.tasks[q].name}", unit="layer", leave=False,
                          disable=not self.state.progress):
            zl = net.layers[index]  # choose_adaptive replaces the layers with the best trial's copies
            space = net.spaces[zl.out_space]
            if q not in space.merged:
                if opts.tolerance is not None:
                    rows.append(self.choose_adaptive(zl, side_p, q, labels[zl.index]))
                    continue
                rows.append(self.choose(zl, side_p, q, labels[zl.index]))
            elif zl.pending:
                self.merge_pending(zl, *self.hessians(zl, side_p, q))
            else:
                continue
            self.retrain()
        return rows

    # -- step 1: Hessians ----------------------------------------------------------------------

    def shared_inputs(self, zl: ZLayer, side_p: frozenset[int], q: int) -> list[int]:
        cols = self.net.spaces[zl.in_space].columns
        return [k for k, c in enumerate(cols) if q in c and side_p & c.keys()]

    def hessians(self, zl: ZLayer, side_p: frozenset[int], q: int,
                 at_turn: bool = True) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(H_P, H_q, shared input columns): eqs. 7-8 on each side's data; P's is the sum of its tasks'.

        `at_turn`: `zl` is the layer whose turn it is (not a later producer of a residual space,
        merged ahead of its turn), so its input may be kept for the next layers (_LayerInputs)."""
        cols = self.shared_inputs(zl, side_p, q)
        if not cols:  # no input shared yet (a later producer of a residual space): the bias alone
            return np.ones((1, 1)) * len(side_p), np.ones((1, 1)), cols
        tasks = [*sorted(side_p), q]
        for t in tasks:
            if t not in self.data:
                raise UsageError(f"mtz: no calibration data for task {self.state.tasks[t].name}")
        hs = {}
        stream = self.inputs.each(zl, tasks, keep=at_turn)
        while True:
            with self.timer("layer inputs"):
                item = next(stream, None)
            if item is None:
                break
            t, x = item
            if zl.kind == "conv":
                k = zl.weight.shape[2:]
                rows = _hessian.layer_rows(_columns(x, cols), kernel=k, strides=tuple(zl.attrs.get("strides", [1] * len(k))),
                                           pads=tuple(zl.attrs.get("pads", [0] * 2 * len(k))),
                                           dilations=tuple(zl.attrs.get("dilations", [1] * len(k))),
                                           max_rows=HESSIAN_ROWS, rng=np.random.default_rng(self.opts.seed))
            else:
                rows = x.reshape(len(x), -1)[:, zl.feature_index(cols)]
            with self.timer("hessians"):
                if rows.shape[0] < rows.shape[1]:  # fewer samples than inputs (VGG fc6): H = R^T R, low rank
                    hs[t] = _hessian.HessianRows.of(rows)
                else:
                    acc = _hessian.HessianAccumulator(rows.shape[1])
                    acc.add(rows)
                    hs[t] = acc.value()
            if not np.isfinite(getattr(hs[t], "r", hs[t])).all():  # --calib values so large that the layer's inputs overflow
                raise MergeError(f"mtz: layer {zl.node}: the layer-wise Hessian of task {self.state.tasks[t].name} "
                                 "is not finite: its --calib data drive the layer's inputs out of float range")
            del x, rows
        h_p = sum(hs[t] for t in side_p)
        return h_p, hs[q], cols

    def vectors(self, zl: ZLayer, weight: np.ndarray, bias: np.ndarray, cols: list[int]) -> np.ndarray:
        """Incoming weights from the shared inputs, bias last: [rows, |shared| * k + 1]."""
        w = weight[:, zl.feature_index(cols)].reshape(len(weight), -1)
        return np.concatenate([w, np.asarray(bias, np.float64).reshape(-1, 1)], axis=1)

    # -- steps 2-3: pairs and merged weights ---------------------------------------------------

    def candidates(self, zl: ZLayer, side_p: frozenset[int], q: int) -> tuple[list[int], list[int]]:
        cols = self.net.spaces[zl.out_space].columns
        return [k for k, c in enumerate(cols) if side_p & c.keys()], [k for k, c in enumerate(cols) if q in c]

    def choose_adaptive(self, zl: ZLayer, side_p: frozenset[int], q: int, label: str) -> dict:
        """The most pairs (up to the share ratio) whose merge, after retraining, keeps every task's
        held-out accuracy within `tolerance` points of its original: a bisection over N_l."""
        cand_p, cand_q = self.candidates(zl, side_p, q)
        # the depthwise layers follow the pairings, the task constants are retrained declined layers
        start = (self.net.spaces, self.net.layers, self.net.depthwise, self.net.task_consts)
        best: tuple | None = None
        hessians = None  # every trial starts from `start`: the layer's Hessians are the same in each

        def attempt(n: int) -> bool:
            nonlocal best, hessians
            self.net.spaces, self.net.layers, self.net.depthwise, self.net.task_consts = copy.deepcopy(start)
            layer = self.net.layers[zl.index]  # this trial's copy
            if n and hessians is None:
                hessians = self.hessians(layer, side_p, q)
            row = self.choose(layer, side_p, q, label, n=n, hessians=hessians)
            self.retrain()
            acc = self.accuracy()
            self.trials += 1
            row["accuracy"] = acc
            ok = all(self.reference[t] - acc[t] <= self.opts.tolerance / 100 for t in acc)
            if self.state.progress:  # a trial with retraining takes minutes: say how each went
                from tqdm import tqdm

                tqdm.write(f"mtz {label}: {n} pairs: " + ", ".join(
                    f"{t} {100 * acc[t]:.2f}% ({100 * (acc[t] - self.reference[t]):+.2f})" for t in acc)
                    + (" within" if ok else " beyond") + f" the tolerance of {self.opts.tolerance} points")
            if ok or n == 0:
                best = (self.net.spaces, self.net.layers, self.net.depthwise, self.net.task_consts, row)
            return ok

        lo, hi = 0, int(round(self.opts.share_ratio * min(len(cand_p), len(cand_q))))
        if not attempt(hi):
            while hi - lo > max(1, (hi + lo) // 16):  # to within 1/16 of the count
                mid = (lo + hi + 1) // 2
                if attempt(mid):
                    lo = mid
                else:
                    hi = mid - 1 if mid - 1 >= lo else lo
            if best is None or best[-1]["shared"] != lo:
                attempt(lo)
        self.net.spaces, self.net.layers, self.net.depthwise, self.net.task_consts, row = best
        return row

    def accuracy(self, originals: bool = False) -> dict[str, float]:
        """Each task's accuracy on its held-out samples (the originals', or the zipped network's)."""
        run_task = self.state.services.run_task
        out = {}
        sess = None if originals else session(self.net.build(), threads=None, optimize=True)
        for task in self.state.tasks:
            ds = self.validation[task.name]
            if originals:
                own = session(task.original, threads=None, optimize=True)
                # in batches, as the zipped network's below: at the original's fixed batch where it has one
                names = TaskInfo(task.name, "", "", {i.name: i.name for i in own.get_inputs()},
                                 {o.name: o.name for o in own.get_outputs()})
                logits = run_task(own, names, ds.x)
            else:
                logits = run_task(sess, TaskInfo(task.name, "", "", task.input_map, task.output_map), ds.x)
            out[task.name] = float((logits.argmax(axis=1) == ds.y).mean())
        return out

    def choose(self, zl: ZLayer, side_p: frozenset[int], q: int, label: str, n: int | None = None,
               hessians: tuple | None = None) -> dict:
        """Steps 1-3 of Algorithm 1 for layer `zl`: `n` pairs (default: the options' count), with the
        layer's (H_P, H_q, columns) where already computed."""
        net, opts = self.net, self.opts
        space_id = zl.out_space
        cand_p, cand_q = self.candidates(zl, side_p, q)
        if n is None:
            n = opts.count(label, zl.node, len(cand_p), len(cand_q))
        if n == 0:
            net.relayout(space_id, side_p, q, [])
            return {"layer": label, "node": zl.node, "candidates": [len(cand_p), len(cand_q)], "shared": 0}
        h_p, h_q, cols = hessians or self.hessians(zl, side_p, q)
        a = self.vectors(zl, zl.weight[cand_p], zl.bias[cand_p], cols)
        b = self.vectors(zl, zl.weight[cand_q], zl.bias[cand_q], cols)
        with self.timer("pair costs"):
            costs = _hessian.pair_costs(h_p, h_q, a, b, alpha=opts.alpha, damping=opts.damping)
        with self.timer("pairing"):
            found = {"optimal": _hessian.pair_optimal(costs.cost, n=n, threshold=opts.threshold if n is None else None),
                     "greedy": _hessian.pair_greedy(costs.cost, n=n, threshold=opts.threshold if n is None else None)}
        if opts.pairing == "random":
            found["random"] = _hessian.pair_random(len(cand_p), len(cand_q), len(found["optimal"][0]), self.opts.rng)
        i, j = found[opts.pairing]
        # relayout puts the pairs' pending rows in sorted order: eq. 10 for them reuses `costs`
        chosen = sorted(zip([cand_p[x] for x in i], [cand_q[y] for y in j], i, j))
        pairs = [(p, c) for p, c, _, _ in chosen]
        net.relayout(space_id, side_p, q, pairs)
        for producer in net.producers(space_id):  # the layer itself, and later producers of a residual space
            if producer is zl:
                self.merge_pending(zl, h_p, h_q, cols, solved=(costs, [c[2] for c in chosen], [c[3] for c in chosen]))
            else:
                self.merge_pending(producer, *self.hessians(producer, side_p, q, at_turn=False))
        return {"layer": label, "node": zl.node, "candidates": [len(cand_p), len(cand_q)], "shared": len(pairs),
                "pairing": opts.pairing, "fallback_pinv": bool(getattr(costs, "fallback", False)),
                **{f"cost_{k}": float(costs.cost[v].sum()) for k, v in found.items()}}

    def merge_pending(self, zl: ZLayer, h_p: np.ndarray, h_q: np.ndarray, cols: list[int],
                      solved: tuple | None = None) -> None:
        """Eqs. 10-11 for the shared rows of `zl`: merged weights from the shared inputs, the tasks'
        own weights from their specific inputs. `solved`: (PairCosts, i, j) of the pair choice that
        made the pending rows, in their order, whose factorisation is reused (for a VGG fc layer
        the factorisation and solves are minutes)."""
        if not zl.pending:
            return
        rows = sorted(zl.pending)
        both = np.stack([zl.pending[r][0] for r in rows])  # [N, 2, in, ...]
        biases = np.stack([zl.pending[r][1] for r in rows])  # [N, 2]
        a = self.vectors(zl, both[:, 0], biases[:, 0], cols)
        b = self.vectors(zl, both[:, 1], biases[:, 1], cols)
        if solved is None:
            with self.timer("pair costs"):
                costs = _hessian.pair_costs(h_p, h_q, a, b, alpha=self.opts.alpha, damping=self.opts.damping)
            i = j = np.arange(len(rows))
        else:
            costs, i, j = solved
        mask = ((a != 0) | (b != 0)) if zl.mask is not None else None
        with self.timer("merged weights"):
            merged = costs.merged(i, j, mask=mask)
        feats = zl.feature_index(cols)
        for k, r in enumerate(rows):
            row = both[k].sum(axis=0)  # each side's row is zero on the other side's specific inputs
            row[feats] = merged[k, :-1].reshape(row[feats].shape)
            zl.weight[r] = row
            zl.bias[r] = merged[k, -1]
            if zl.mask is not None:
                zl.mask[r] = row != 0
        zl.pending = {}

    # -- step 4: retraining --------------------------------------------------------------------

    def retrain(self) -> None:
        """`retrain_steps` steps of calibration; a step is one batch of every task, as in the
        paper's retraining iterations (calibrate() alternates the tasks' batches, so T tasks take
        T of its steps)."""
        steps = self.opts.retrain_steps * len(self.calib)
        if not steps:
            return
        state = self.state
        calibrate, config_type = state.services.calibrate, state.services.calibration_config
        if calibrate is None:
            raise MergeError("mtz retraining needs the calibration service (onnxmerge.api.merge hands it in)")
        config = dataclasses.replace(state.calibration or config_type(), steps=steps, layer_loss_weight=0.0,
                                     seed=self.opts.seed + len(self.retrain_history))
        info = MergedInfo("", "mtz", {}, [TaskInfo(t.name, "", "", t.input_map, t.output_map) for t in state.tasks])
        result = calibrate(self.net.build(), info, {t.name: t.original for t in state.tasks}, self.calib, config,
                           progress=state.progress)
        self.net.read_back(result.model)
        self.retrain_history.append(result.summary())
        self.seconds += result.seconds

    def summary(self) -> dict:
        extra = {"tolerance_points": self.opts.tolerance, "trials": self.trials,
                 "original_accuracy_held_out": self.reference} if self.opts.tolerance is not None else {}
        return {**extra, "retrain_steps_per_layer": self.opts.retrain_steps,
                "retrain_steps_total": sum(h["steps"] for h in self.retrain_history) // max(1, len(self.calib)),
                "retrain_batches_total": sum(h["steps"] for h in self.retrain_history),
                "retrain_seconds": round(self.seconds, 2),
                "seconds": {k: round(v, 2) for k, v in self.spent.items()}}


def _report_declined(state: MergeState, net: ZippedNet, zippable: list[ZLayer]) -> None:
    """One note per declined node (with the count of the layers declined after it) and the figure
    mtz_declined; a note that nothing was zipped where no layer could be."""
    if not zippable:
        why = "every layer is declined or a task head" if net.declined else "every layer is a task head"
        state.notes.append(f"mtz: nothing to zip ({why}): every task runs on its own, as with --method pack")
    if not net.declined:
        return
    state.figures["mtz_declined"] = [{k: d[k] for k in ("node", "op", "reason")} for d in net.declined]
    roots = [d for d in net.declined if d["after"] is None]
    for d in roots[:MAX_NOTES]:
        after = sum(1 for e in net.declined if e["after"] == d["node"])
        with_layers = f"; it and the {after} layer(s) after it run per task" if after else "; it runs per task"
        state.notes.append(f"mtz: {d['node']} ({d['op']}) declined: {d['reason']}{with_layers}")
    if len(roots) > MAX_NOTES:
        more = roots[MAX_NOTES:]
        state.notes.append(f"mtz: {len(more)} more declined nodes ({', '.join(d['node'] for d in more[:3])}, ...) and "
                           f"{sum(1 for e in net.declined if e['after'] in {d['node'] for d in more})} layer(s) after "
                           "them run per task (figure mtz_declined lists them)")


class _LayerInputs:
    """Each task's activations at the inputs of the zipped network's layers, computed from the
    nearest tensors already computed rather than from the model input.

    Zipping layer l (Algorithm 1) changes l's weights, the column order of its output space and the
    input columns of the layers that read it: nothing that l's own input depends on, since layers are
    zipped in graph order and a residual space is re-laid out at its first producer, before any of its
    tensors is computed. So, without retraining, a layer's input computed at its turn stays what the
    zipped network computes for the rest of the merge step, and the next layer's input needs only the
    nodes in between: a deep network costs one forward pass per task instead of one per layer (the
    VGG-16 scale run). Only tensors that a later layer input still needs are kept (the frontier: one
    tensor for a chain, two inside a residual block). Retraining changes every weight, so with
    `reuse` off (retrain steps) every input is computed from the model input again.
    """

    def __init__(self, net: ZippedNet, data: dict[int, np.ndarray], reuse: bool):
        self.net, self.data, self.reuse = net, data, reuse
        self.reset()

    def reset(self) -> None:
        self.kept: dict[str, dict[int, np.ndarray]] = {self.net.input_name: dict(self.data)}

    def each(self, zl: ZLayer, tasks: list[int], keep: bool):
        """Yields (task, activations at `zl`'s input) one task at a time, so that only one task's
        copy of a large input is alive while its Hessian is formed. `keep`: `zl` is at its turn, so
        its input may be remembered for the next layers (within KEEP_BYTES, else it is computed again
        from the tensors before it when a later input needs it)."""
        if not self.reuse:
            self.reset()
        model = self.net.build()
        target = self.net.layer_inputs[zl.index]
        producers = {out: list(node.input) for node in model.graph.node for out in node.output}
        later = [self.net.layer_inputs[z.index] for z in self.net.layers if z.index > zl.index]
        keep = keep and self.reuse
        if keep:
            self._drop_all_but(_reached(producers, [target, *later], set(self.kept)))
        known = self.kept.get(target, {})
        missing = [t for t in tasks if t not in known]
        sess = _sub_session(model, [n for n in self.kept if n != target], target) if missing else None
        del model
        names = [i.name for i in sess.get_inputs()] if sess else []
        new: dict[int, np.ndarray] | None = {} if keep and target not in self.kept else None
        for t in tasks:
            if t in known:
                yield t, known[t]
                continue
            x = _activations(sess, {n: self.kept[n][t] for n in names})
            if new is not None and not new and self._bytes() + x.nbytes * len(missing) > KEEP_BYTES:
                new = None
            if new is not None:
                new[t] = x
            yield t, x
            del x
        if new:
            self.kept[target] = new
            self._drop_all_but(_reached(producers, later, set(self.kept)))

    def _bytes(self) -> int:
        return sum(x.nbytes for name, v in self.kept.items() if name != self.net.input_name for x in v.values())

    def _drop_all_but(self, live: set[str]) -> None:
        self.kept = {n: v for n, v in self.kept.items() if n in live or n == self.net.input_name}


def _columns(x: np.ndarray, cols: list[int]) -> np.ndarray:
    """x[:, cols], as a view when `cols` are contiguous (shared columns come first in a space), so
    that a large layer input (VGG-16 conv1_2: 3.3 GB for 256 samples) is not copied."""
    if cols == list(range(cols[0], cols[-1] + 1)):
        return x[:, cols[0]:cols[-1] + 1]
    return x[:, cols]


def _reached(producers: dict[str, list[str]], targets: list[str], stops: set[str]) -> set[str]:
    """The tensors of `stops` that computing `targets` reads, walking back from them through the
    nodes (`producers`: tensor -> the producing node's inputs) and stopping at the first tensor of
    `stops` on each path."""
    found, seen, stack = set(), set(), list(targets)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in stops:
            found.add(name)
        elif name in producers:
            stack.extend(i for i in producers[name] if i)
    return found


def _sub_session(model: onnx.ModelProto, starts: list[str], name: str):
    """A session of the part of `model` that computes tensor `name` from the tensors `starts` (the
    ones it needs become its inputs; the model input among them if needed)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.inputs = [tensors[n] for n in starts if n in tensors]
    graph.outputs = [tensors[name]]
    for t in [*graph.inputs, *graph.outputs]:
        t.dtype = np.float32
    graph.cleanup(remove_unused_graph_inputs=True)
    sub = gs.export_onnx(graph)
    sub.ir_version = model.ir_version
    return session(sub, threads=None, optimize=True)


def _activations(sess, feeds: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """The session's output on `feeds` (inputs of equal length), in batches written into one
    array: small batches, so that a large layer's intermediate tensors stay small, and no list of
    batch outputs beside their concatenation."""
    n = len(next(iter(feeds.values())))
    out = None
    for i in range(0, n, batch):
        got = sess.run(None, {k: v[i:i + batch] for k, v in feeds.items()})[0]
        if out is None:
            out = np.empty((n, *got.shape[1:]), dtype=got.dtype)
        out[i:i + len(got)] = got
    return out
