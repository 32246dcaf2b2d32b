"""Calibration: fine-tune a merged model in PyTorch against the original models, write it back to ONNX.

Every method ends here (DESIGN.md, "Calibration"). The merged model becomes a `torch.nn.Module`
(`onnxmerge.calibration.bridge`; a weight shared between tasks is one parameter), the originals are frozen
teachers, and the tasks' batches are interleaved: step k trains task k mod T. The loss of a batch of
task t is

    L_t = w_ce * CE(z_t, y)                                     labels, where the data has them
        + lambda * sum_l mean |F_l(x) - F*_l(x)|                per-layer output-preserving loss
        + w_kd * T^2 * KL(softmax(z*_t / T) || softmax(z_t / T))  soft-target distillation

where F_l / F*_l are the merged and the original output of aligned layer l (zipper paper eq. 2,
NeuralMerger section 3.3, MTZ's light retraining) and z / z* the merged and original logits. Without
labels the last two terms alone calibrate (label-free calibration, which none of the papers offers).
Adam, its learning rate warmed up linearly to `lr` and then decayed along a cosine to 0 at the step
budget (`_scheduler`; `schedule="step"`: the earlier step decay). Early stopping (`_EarlyStopping`):
a held-out part of each task's data (`_hold_out`) is scored at the start and every `eval_every`
steps, by held-out accuracy (ties: distillation loss), or by the distillation loss alone without
labels; the best weights are kept, and the run ends after `patience` evaluations without improvement
or at the budget. The start being a candidate, calibration never returns weights that score worse
on the held-out samples than those it was given; while it is the best, a later evaluation replaces
it only when its held-out accuracy is higher by more than one standard error (a model that starts
at its best is not moved by the noise of a few samples).

Data-parallel: under `torchrun` (WORLD_SIZE > 1) every process takes an equal slice of each batch,
and DistributedDataParallel averages the gradients, so N processes compute what one process computes
on the whole batch, up to float summation order.

Checkpoints (`Checkpoint`): every `every` steps, and at the step boundary after a Ctrl-C or SIGTERM,
the trainable state (weights, Adam and learning-rate schedule state, the step, the data order and
the random number generators' states, the loss history, early stopping's evaluations and best
weights) is saved atomically with torch.save,
together with a fingerprint of the settings, the merged model, the teachers and the data. `resume`
continues from it and refuses a checkpoint of other inputs or settings; the resumed run computes
the same steps on the same batches from the same state, so its weights equal an uninterrupted
run's bit for bit (on the same machine, device and number of threads).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxmerge.data import check_fits
from onnxmerge.errors import MergeError, UsageError, first_line
from onnxmerge.graph.convert import FLOAT_TYPES
from onnxmerge.model.contract import MergedInfo, TaskInfo, logits_output
from onnxmerge.model.loading import load_model
from onnxmerge.model.runtime import fixed_batch_of, input_signature
from onnxmerge.model.saving import model_digest, write_atomic

CHECKPOINT_FORMAT = 2  # 2: early stopping's state (evaluations, best weights)
CHECKPOINT_EVERY = 100  # steps between checkpoints by default


@dataclass
class CalibrationConfig:
    """The calibration settings. The defaults (issue 18; README "Calibration") are a budget, not a
    count: with enough steps for early stopping (`steps >= 3 * eval_every`) a held-out part of each
    task's data (`holdout`) is scored every `eval_every` steps, the best weights are kept, and the run
    stops after `patience` evaluations without improvement. The learning rate warms up linearly over
    the first `warmup` of the budget to `lr`, then follows a cosine to 0 at the budget's end
    (schedule "cosine"); schedule "step" is the earlier decay (times `lr_gamma` every `lr_step`)."""

    steps: int = 6000  # the budget; early stopping may end sooner (README "Calibration defaults")
    lr: float = 3e-3  # the peak (cosine) or initial (step) learning rate (README "Calibration defaults")
    batch_size: int = 64
    layer_loss_weight: float = 1.0  # lambda
    distill_weight: float = 1.0  # w_kd
    label_weight: float = 1.0  # w_ce
    temperature: float = 2.0  # T
    use_labels: bool = True  # False: label-free even where the data has labels
    lr_step: int | None = None  # schedule "step": default a third of the steps
    lr_gamma: float = 0.3  # schedule "step"
    seed: int = 0
    device: str = "cpu"
    schedule: str = "cosine"  # "cosine" (with warmup) or "step"
    warmup: float = 0.05  # schedule "cosine": fraction of the budget spent warming up
    eval_every: int = 100  # steps between held-out evaluations; 0: no early stopping
    patience: int = 10  # evaluations without improvement before stopping
    holdout: int = 1000  # most held-out samples per task (at most a fifth of its data)

    def validate(self) -> CalibrationConfig:
        checks = {"steps": self.steps >= 0, "lr": self.lr > 0, "batch_size": self.batch_size > 0,
                  "temperature": self.temperature > 0, "lr_gamma": 0 < self.lr_gamma <= 1,
                  "layer_loss_weight": self.layer_loss_weight >= 0, "distill_weight": self.distill_weight >= 0,
                  "label_weight": self.label_weight >= 0, "schedule": self.schedule in ("cosine", "step"),
                  "warmup": 0 <= self.warmup < 1, "eval_every": self.eval_every >= 0, "patience": self.patience >= 1,
                  "holdout": self.holdout >= 0}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UsageError(f"calibration: invalid {', '.join(f'--{k.replace(chr(95), chr(45))}={getattr(self, k)}' for k in bad)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"--device {self.device}: use cpu or cuda")
        return self


@dataclass
class Checkpoint:
    """Where and how often calibration saves its state, and whether it resumes from it.

    The file is written atomically (temporary file + rename) every `every` steps and at the step
    boundary after an interrupt; whoever saves the calibrated model removes it (`remove`)."""

    path: Path
    every: int = CHECKPOINT_EVERY
    resume: bool = False

    def __post_init__(self):
        self.path = Path(self.path)

    def validate(self) -> Checkpoint:
        """Refuse, before any work, a bad interval, a resume without a file, or a fresh run over one."""
        if self.every < 1:
            raise UsageError(f"--checkpoint-every {self.every}: give a number of steps >= 1")
        if self.path.is_dir():
            raise UsageError(f"{self.path}: is a folder; give a file name for the checkpoint")
        if not self.path.parent.is_dir():
            raise UsageError(f"{self.path}: the checkpoint folder {self.path.parent} does not exist")
        if self.resume and not self.path.is_file():
            raise UsageError(f"{self.path}: no checkpoint to resume from (--resume)")
        if not self.resume and self.path.exists():
            raise UsageError(f"{self.path}: a calibration checkpoint is already there: give --resume to "
                             "continue it, or remove it to start over")
        return self

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class CalibrationResult:
    model: onnx.ModelProto
    history: list[dict[str, float]] = field(default_factory=list)  # per step: task, losses
    seconds: float = 0.0
    world_size: int = 1
    batch_size: int | None = None  # the model's fixed batch, where it replaced the setting's
    # held-out evaluations (early stopping): step, score, per task accuracy / kd; empty without
    evals: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Mean losses per task over the first and the last tenth of the steps."""
        out: dict[str, Any] = {"steps": len(self.history), "seconds": round(self.seconds, 2),
                               "processes": self.world_size}
        if self.batch_size is not None:  # overrides the setting in record_calibration's record
            out["batch_size"] = self.batch_size
        if self.evals:  # the weights kept are those of the last evaluation taken
            best = kept_evaluation(self.evals)
            out["early_stopping"] = {"evaluations": len(self.evals), "best_step": best["step"],
                                     "held_out": {k: v for k, v in best.items()
                                                  if k not in ("step", "score", "margin", "kept")}}
        for task in sorted({h["task"] for h in self.history}):
            rows = [h for h in self.history if h["task"] == task]
            k = max(1, len(rows) // 10)
            out[task] = {"loss_first": _mean(rows[:k], "loss"), "loss_last": _mean(rows[-k:], "loss")}
        return out


@dataclass
class _TaskPlan:
    info: TaskInfo
    input: str  # merged input name
    output: str  # merged logits name
    teacher_input: str
    teacher_output: str
    layers: list[tuple[str, str]]  # (merged tensor, original tensor)
    channels: dict[str, list[int]]  # original tensor -> its channel order in the merged model
    x: np.ndarray
    y: np.ndarray | None


def calibrate(model: onnx.ModelProto, info: MergedInfo, teachers: dict[str, onnx.ModelProto | str | Path],
              calib: dict, config: CalibrationConfig | None = None, *, frozen: tuple[str, ...] = (),
              progress: bool = True, checkpoint: Checkpoint | None = None) -> CalibrationResult:
    """Fine-tune `model` on `calib` (task -> Dataset) against `teachers` (task -> original model).

    Returns the calibrated model (same graph, new initializer values). Runs data-parallel when
    torch.distributed is initialised (see `init_distributed`). With `checkpoint`, saves its state
    there as it goes and on an interrupt (then re-raised), and resumes from it if asked; the
    caller removes the file once the calibrated model is saved.
    """
    torch, F = _torch()
    from onnxmerge.calibration.bridge import OnnxModule

    config = (config or CalibrationConfig()).validate()
    if not calib:
        raise UsageError("calibration needs data: give --calib TASK=PATH for at least one task")
    rank, world = _rank_world(torch)
    # a merge at a fixed batch (its models' batch dim could not be made symbolic) runs at no other size
    fixed = fixed_batch_of(model)
    if fixed is not None:
        if world > 1:  # each process would run a slice of the batch
            raise UsageError(f"calibration: the merged model runs at its fixed batch of {fixed} only; "
                             "calibrate it in one process")
        config = dataclasses.replace(config, batch_size=fixed)
    if config.batch_size % world:
        raise UsageError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    torch.manual_seed(config.seed)

    teacher_models = {name: _load(teachers[name]) for name in calib if name in teachers}
    calib, held = _hold_out(calib, config)
    plans = [_plan(model, info.task(name), teacher_models.get(name), ds, config) for name, ds in calib.items()]
    student = OnnxModule(model, frozen=frozen, trainable=trainable_names(model).__contains__).to(device).train()
    teacher_modules = {p.info.name: OnnxModule(teacher_models[p.info.name], trainable=lambda _: False).to(device).eval()
                       for p in plans}
    trainable = [p for p in student.parameters() if p.requires_grad]
    if not trainable:
        raise UsageError("calibration: every weight is frozen; nothing to train")
    net = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # every step trains one task, so the other tasks' parameters get no gradient in that step
        net = DistributedDataParallel(student, find_unused_parameters=True)
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    scheduler = _scheduler(torch, optimizer, config)
    rng = np.random.default_rng(config.seed)
    orders = {p.info.name: _Batches(len(p.x), config.batch_size, rng) for p in plans}
    shard = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    trainer = _Trainer(student, optimizer, scheduler, rng, orders, torch)
    fingerprint = None
    if checkpoint is not None:
        fingerprint = _fingerprint(model, teacher_models, plans, config, frozen)
        if checkpoint.resume:
            trainer.restore(_load_checkpoint(checkpoint.path, fingerprint, torch))

    from tqdm import tqdm

    history, running = trainer.history, trainer.running
    stopper = _EarlyStopping(trainer, plans, held, teacher_modules, config, device, torch) if held else None
    if stopper is not None and not trainer.evals:  # the starting point is a candidate: never end worse
        stopper.evaluate()
    start = time.perf_counter()
    bar = tqdm(range(trainer.step, config.steps), initial=trainer.step, total=config.steps, desc="calibrate",
               unit="step", disable=not progress or rank != 0, leave=False)
    with _DeferredInterrupts() as interrupted:
        for step in bar:
            plan = plans[step % len(plans)]
            idx = orders[plan.info.name].next()
            if len(idx) < config.batch_size:  # a data set smaller than one batch: every process the same
                idx = np.resize(idx, config.batch_size)
            idx = idx[shard]
            x = torch.from_numpy(plan.x[idx]).to(device)
            with torch.no_grad():
                wanted = [plan.teacher_output] + [orig for _, orig in plan.layers]
                ref = teacher_modules[plan.info.name]({plan.teacher_input: x}, wanted)
            got = net({plan.input: x}, [plan.output] + [merged for merged, _ in plan.layers])
            logits, ref_logits = got[plan.output], ref[plan.teacher_output]
            terms = {}
            if plan.y is not None and config.use_labels and config.label_weight > 0:
                y = torch.from_numpy(plan.y[idx]).to(device)
                terms["ce"] = config.label_weight * F.cross_entropy(logits, y)
            if plan.layers and config.layer_loss_weight > 0:
                terms["layer"] = config.layer_loss_weight * sum(
                    (got[m] - _in_order(ref[o], plan.channels.get(o))).abs().mean() for m, o in plan.layers)
            if config.distill_weight > 0:
                t = config.temperature
                terms["kd"] = config.distill_weight * t * t * F.kl_div(
                    F.log_softmax(logits / t, dim=1), F.log_softmax(ref_logits / t, dim=1),
                    log_target=True, reduction="batchmean")
            if not terms:
                raise UsageError(f"calibration of task {plan.info.name}: no loss term is on (no labels and zero weights)")
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # False when every weight of this task is frozen
                loss.backward()
                optimizer.step()
            scheduler.step()
            record = {"step": step, "task": plan.info.name, "loss": loss.item()} | {k: v.item() for k, v in terms.items()}
            history.append(record)
            running[plan.info.name] = 0.9 * running.get(plan.info.name, record["loss"]) + 0.1 * record["loss"]
            bar.set_postfix({k: f"{v:.4f}" for k, v in running.items()}, refresh=False)
            trainer.step = step + 1
            stop = stopper is not None and stopper.due() and stopper.evaluate()
            if checkpoint is not None and rank == 0 and (trainer.step % checkpoint.every == 0 or interrupted):
                trainer.save(checkpoint.path, fingerprint, trainer.seconds + time.perf_counter() - start)
            if interrupted:  # the step is complete and saved: now act on the Ctrl-C / SIGTERM
                bar.close()
                interrupted.forward()
            if stop:
                break
    bar.close()
    if stopper is not None:
        stopper.restore_best()
    calibrated = student.write_back(model)
    onnx.checker.check_model(calibrated)
    return CalibrationResult(calibrated, history, trainer.seconds + time.perf_counter() - start, world, fixed,
                             evals=list(trainer.evals))


# Inputs (by position) that hold settings, not learned weights: Clip's bounds (ReLU6's 0 and 6),
# BatchNormalization's running statistics, Pad's pads and value.
_NOT_WEIGHTS = {"Clip": (1, 2), "BatchNormalization": (3, 4), "Pad": (1, 2, 3)}


def trainable_names(model: onnx.ModelProto) -> set[str]:
    """The initializers calibration trains: every float initializer except the settings above."""
    floats = {i.name for i in model.graph.initializer if i.data_type in FLOAT_TYPES}
    floats |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    settings = {n.input[k] for n in model.graph.node for k in _NOT_WEIGHTS.get(n.op_type, ()) if k < len(n.input)}
    # a setting built by a Concat (the tasks' fused branches: passes/common/fuse_branches.py) is
    # made of settings
    concats = {n.output[0]: n.input for n in model.graph.node if n.op_type == "Concat"}
    todo = [s for s in settings if s in concats]
    while todo:
        parts = [p for p in concats[todo.pop()] if p not in settings]
        settings.update(parts)
        todo += [p for p in parts if p in concats]
    return floats - settings



def _teacher_input(model: onnx.ModelProto) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def _plan(model: onnx.ModelProto, task: TaskInfo, teacher: onnx.ModelProto | None, ds, config) -> _TaskPlan:
    if teacher is None:
        raise MergeError(f"task {task.name!r}: no original model to calibrate against (give --original {task.name}=PATH)")
    if len(task.inputs) != 1 or len(task.outputs) < 1:
        raise MergeError(f"task {task.name!r}: calibration supports tasks with one input")
    (orig_in, merged_in), = task.inputs.items()
    graph_inputs = {i.name: i for i in model.graph.input}
    elem, dims = input_signature(graph_inputs[merged_in])
    check_fits(ds, dims, elem, where=f"--calib {task.name}", input_name=merged_in)
    orig_out, merged_out = logits_output(task, {o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output})
    tensors = _tensor_names(model)
    teacher_tensors = _tensor_names(teacher)
    layers = [(m, o) for o, m in task.layers.items() if m in tensors and o in teacher_tensors and o != orig_out]
    y = ds.y if (ds.y is not None and config.use_labels) else None
    return _TaskPlan(task, merged_in, merged_out, _teacher_input(teacher), orig_out, layers, task.channels,
                     np.ascontiguousarray(ds.x, np.float32),
                     None if y is None else y.astype(np.int64))


def _in_order(tensor, order: list[int] | None):
    """The teacher's layer output with its channels (axis 1) in the merged model's order."""
    return tensor if order is None else tensor[:, order]


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    return {o for n in model.graph.node for o in n.output}


def kept_evaluation(evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The early-stopping evaluation whose weights are kept: the last one taken (records without
    "kept" predate the start's margin, when every new best was taken)."""
    return next((e for e in reversed(evals) if e.get("kept", True)), None)


MIN_HELD_OUT = 50  # fewer held-out samples per task score too coarsely to stop on


def _hold_out(calib: dict, config: CalibrationConfig) -> tuple[dict, dict]:
    """(training data, held-out data) per task. Early stopping holds out min(`holdout`, a fifth) of
    each task's samples, drawn by `config.seed` (the originals may have been trained on any of them,
    so only samples calibration does not train on tell whether it still generalises). None when the
    budget leaves fewer than three evaluations or a task has too few samples: then every sample trains."""
    if not config.eval_every or not config.holdout or config.steps < 3 * config.eval_every:
        return calib, {}
    sizes = {name: min(config.holdout, len(ds) // 5) for name, ds in calib.items()}
    if min(sizes.values()) < MIN_HELD_OUT:
        return calib, {}
    split = {name: ds.split(sizes[name], seed=config.seed) for name, ds in calib.items()}
    return {n: s[0] for n, s in split.items()}, {n: s[1] for n, s in split.items()}


def _scheduler(torch, optimizer, config: CalibrationConfig):
    """The learning-rate schedule. "cosine": linear warmup over the first `warmup` of the budget to
    `lr`, then lr(s) = lr * (1 + cos(pi * (s - w) / (steps - w))) / 2, 0 at the budget's end. Chosen
    because it needs no per-pair tuning of decay points: it is set by the budget alone, and with
    early stopping a high peak is safe (the best weights are kept). "step": lr * gamma^(s // lr_step)."""
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step or max(1, config.steps // 3),
                                               gamma=config.lr_gamma)
    warm = round(config.warmup * config.steps)
    total = max(1, config.steps - warm)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / total)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _EarlyStopping:
    """Score the student on every task's held-out samples at the start and every `eval_every` steps;
    keep the best weights; stop after `patience` evaluations without improvement.

    The score is (mean held-out accuracy, -mean distillation loss) where every task's data has
    labels (ties in accuracy, coarse on a few hundred samples, go to the loss), else the mean
    held-out distillation loss T^2 KL(softmax(z*/T) || softmax(z/T)) alone. Its state lives in the
    trainer, so a resumed run stops where an uninterrupted one does."""

    def __init__(self, trainer, plans, held: dict, teachers: dict, config: CalibrationConfig, device, torch):
        self.trainer, self.config, self.device, self.torch = trainer, config, device, torch
        self.sets = []
        for plan in plans:
            ds = held[plan.info.name]
            x = np.ascontiguousarray(ds.x, np.float32)
            y = ds.y.astype(np.int64) if ds.y is not None and config.use_labels else None
            ref = self._logits(teachers[plan.info.name], plan.teacher_input, plan.teacher_output, x)
            self.sets.append((plan, x, y, ref))
        self.labelled = all(y is not None for _, _, y, _ in self.sets)

    def _logits(self, module, name: str, output: str, x: np.ndarray):
        torch, b = self.torch, self.config.batch_size
        parts = []
        with torch.no_grad():
            for i in range(0, len(x), b):
                chunk = x[i:i + b]
                n = len(chunk)  # the last batch is padded to the full size: a model may run at one batch only
                chunk = np.resize(chunk, (b, *chunk.shape[1:])) if n < b else chunk
                parts.append(module({name: torch.from_numpy(chunk).to(self.device)}, [output])[output][:n].float())
        return torch.cat(parts)

    def due(self) -> bool:
        step = self.trainer.step
        return step % self.config.eval_every == 0 or step == self.config.steps

    def evaluate(self) -> bool:
        """Score the current weights, keep them if they are the best so far; whether to stop."""
        torch, t, trainer = self.torch, self.config.temperature, self.trainer
        student = trainer.student
        student.eval()  # no dropout: the evaluation draws no random numbers, so resuming stays exact
        record: dict[str, Any] = {"step": trainer.step}
        accs, kds = [], []
        for plan, x, y, ref in self.sets:
            z = self._logits(student, plan.input, plan.output, x)
            kd = t * t * torch.nn.functional.kl_div(torch.log_softmax(z / t, 1), torch.log_softmax(ref / t, 1),
                                                    log_target=True, reduction="batchmean").item()
            row = {"kd": kd}
            if y is not None:
                row["accuracy"] = float(np.mean(z.argmax(1).cpu().numpy() == y))
                accs.append(row["accuracy"])
            kds.append(kd)
            record[plan.info.name] = row
        student.train()
        record["score"] = [float(np.mean(accs)), -float(np.mean(kds))] if self.labelled else [-float(np.mean(kds))]
        if not trainer.evals and self.labelled:  # the start: the noise of its held-out accuracy
            record["margin"] = float(np.sqrt(sum(a * (1 - a) / len(x) for a, (_, x, _, _) in zip(accs, self.sets)))
                                     / len(accs))
        best = kept_evaluation(trainer.evals)
        record["kept"] = best is None or record["score"] > best["score"] and self._beats_start(record["score"])
        if record["kept"]:
            trainer.best_weights = {n: p.detach().cpu().clone() for n, p in student.named_parameters() if p.requires_grad}
            trainer.stale = 0
        else:
            trainer.stale += 1
        trainer.evals.append(record)
        return trainer.stale >= self.config.patience

    def _beats_start(self, score: list[float]) -> bool:
        """While the start is the best, a later evaluation replaces it only when its mean held-out
        accuracy is higher by more than one standard error of the start's (`margin`): a model that
        starts at its best (pack, an exact merge) would otherwise take the weights of whichever
        evaluation a few samples' noise favours, and move its test accuracy for nothing."""
        evals = self.trainer.evals
        best = kept_evaluation(evals)
        if best is None or best is not evals[0] or "margin" not in best:
            return True
        return score[0] > best["score"][0] + best["margin"]

    def restore_best(self) -> None:
        """Put the best evaluation's weights back into the student."""
        if self.trainer.best_weights is None:
            return
        params = dict(self.trainer.student.named_parameters())
        with self.torch.no_grad():
            for name, value in self.trainer.best_weights.items():
                params[name].copy_(value)


class _Batches:
    """Seeded epochs of shuffled indices, handed out one batch at a time."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator):
        self.n, self.batch, self.rng, self.order, self.pos = n, batch, rng, np.empty(0, np.int64), 0

    def next(self) -> np.ndarray:
        if self.pos >= len(self.order):
            self.order, self.pos = self.rng.permutation(self.n), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx


class _Trainer:
    """The state a resumed calibration needs, and its checkpoint file (torch.save of plain values)."""

    def __init__(self, student, optimizer, scheduler, rng: np.random.Generator, orders: dict[str, _Batches], torch):
        self.student, self.optimizer, self.scheduler, self.rng, self.orders = student, optimizer, scheduler, rng, orders
        self.torch = torch
        self.step, self.seconds = 0, 0.0  # steps done, seconds spent in earlier runs
        self.history: list[dict[str, float]] = []
        self.running: dict[str, float] = {}
        # early stopping: the held-out evaluations so far, the best one's weights, evaluations since it
        self.evals: list[dict[str, Any]] = []
        self.best_weights: dict[str, Any] | None = None
        self.stale = 0

    def save(self, path: Path, fingerprint: str, seconds: float) -> None:
        """Write the state after `self.step` steps to `path`, atomically (temporary file + rename)."""
        torch = self.torch
        state = {
            "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": self.step, "seconds": seconds,
            "weights": {n: p.detach().cpu() for n, p in self.student.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "batches": {name: {"order": torch.from_numpy(b.order.copy()), "pos": b.pos} for name, b in self.orders.items()},
            "history": self.history, "running": self.running,
            "evals": self.evals, "best_weights": self.best_weights, "stale": self.stale,
        }
        write_atomic(path, lambda tmp: torch.save(state, tmp))

    def restore(self, saved: dict) -> None:
        """Put a checkpoint's state (from `_load_checkpoint`) back into the live objects."""
        torch = self.torch
        params = dict(self.student.named_parameters())
        with torch.no_grad():
            for name, value in saved["weights"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.rng.bit_generator.state = saved["numpy_rng"]
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        for name, b in self.orders.items():
            b.order, b.pos = saved["batches"][name]["order"].numpy(), saved["batches"][name]["pos"]
        self.step, self.seconds = saved["step"], saved["seconds"]
        self.history[:], self.running = list(saved["history"]), dict(saved["running"])
        self.evals[:], self.best_weights, self.stale = list(saved["evals"]), saved["best_weights"], saved["stale"]


def _load_checkpoint(path: Path, fingerprint: str, torch) -> dict:
    """The checkpoint at `path`, refused in one line unless it is one of this very calibration."""
    try:
        # weights_only: the file holds tensors and plain values only, so no pickled code runs
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MergeError(f"{path}: not a calibration checkpoint ({first_line(e)})") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise MergeError(f"{path}: not a calibration checkpoint of this onnxmerge version")
    if saved.get("fingerprint") != fingerprint:
        raise MergeError(f"{path}: the checkpoint is of another calibration (other models, data or settings); "
                         "rerun with the same ones, or remove it to start over")
    return saved


def _fingerprint(model: onnx.ModelProto, teachers: dict[str, onnx.ModelProto], plans: list[_TaskPlan],
                 config: CalibrationConfig, frozen: tuple[str, ...]) -> str:
    """sha256 of everything that decides the calibration's result: the settings (but the device),
    the frozen weights, the merged model, each task's teacher and data, in order."""
    h = hashlib.sha256()
    settings = {k: v for k, v in config_dict(config).items() if k != "device"}
    h.update(json.dumps([settings, sorted(frozen)], sort_keys=True).encode())
    h.update(model_digest(model).encode())
    for plan in plans:
        h.update(plan.info.name.encode())
        h.update(model_digest(teachers[plan.info.name]).encode())
        h.update(memoryview(plan.x))
        h.update(b"" if plan.y is None else memoryview(plan.y))
    return h.hexdigest()


class _DeferredInterrupts:
    """Within the block, SIGINT and SIGTERM are noted rather than acted on, so that the training
    loop stops at a step boundary with a consistent state to save; `forward()` then hands the
    signal to the handler that was there before (Ctrl-C: KeyboardInterrupt; the command line's
    SIGTERM handler: its exception; the default action: the signal is raised again). A second
    signal acts at once. Outside the main thread (where handlers cannot be set) nothing is deferred.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _DeferredInterrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                # None: a handler set outside Python, which we treat as the default action
                self.previous[sig] = signal.signal(sig, self._note) or signal.SIG_DFL
        return self

    def _note(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, mid-step (the last checkpoint stays)
            self.forward(signum)
        self.signum = signum

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def forward(self, signum: int | None = None) -> None:
        """Restore the earlier handlers and deliver the (pending) signal to them."""
        signum = signum or self.signum
        handler = self.previous.get(signum, signal.SIG_DFL)
        self.signum = None
        self._restore()
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        if self.signum is not None:  # arrived after the last step: act on it now
            self.forward()
        self._restore()


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1), start the process group: gloo on CPU, nccl on CUDA."""
    torch, _ = _torch()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend=backend)
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _rank_world(torch)


def _rank_world(torch) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model

    return load_model(model)


def _torch():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise UsageError("calibration needs PyTorch: pip install torch==2.13.0 (the CPU build)") from None
    return torch, F


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def perturb_weights(model: onnx.ModelProto, sigma: float, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` with Gaussian noise of `sigma` times each float weight tensor's own standard
    deviation added to every trainable initializer: the damage the recovery experiment repairs."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    names = trainable_names(model)
    for init in out.graph.initializer:
        if init.name in names and init.data_type == onnx.TensorProto.FLOAT:
            w = numpy_helper.to_array(init)
            noisy = w + sigma * w.std() * rng.standard_normal(w.shape)
            init.CopyFrom(numpy_helper.from_array(noisy.astype(np.float32), init.name))
    return out


def config_dict(config: CalibrationConfig) -> dict[str, Any]:
    """The settings as a JSON-ready dict (the report and the metadata record them)."""
    return asdict(config)


def record_calibration(info: MergedInfo, config: CalibrationConfig, result: CalibrationResult) -> None:
    """Note the calibration in the merged model's metadata (the fidelity figures predate it)."""
    info.params["calibration"] = config_dict(config) | result.summary()
    info.fidelity["measured_before_calibration"] = True
