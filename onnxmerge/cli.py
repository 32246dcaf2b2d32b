"""The command line: `onnxmerge a.onnx b.onnx -o merged.onnx`, plus inspect, eval, demo and methods.

Errors reach the user as one line naming the file and what is wrong, exit status 2 for usage errors
and 1 for failures, no traceback unless --debug (DESIGN.md, "What bad input gets").

Each command imports the API, calibration and measurement when it runs, not at start-up, so that
`onnxmerge --help`, `onnxmerge methods` and usage errors answer without loading them. The CLI names
no method: its flags, choices and checks come from the methods' entries (onnxmerge.passes).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from onnxmerge.calibration.calibrate import CHECKPOINT_EVERY
from onnxmerge.errors import OnnxMergeError, UsageError
from onnxmerge.model.contract import read_metadata
from onnxmerge.passes import BASELINE, METHODS, get_method
from onnxmerge.pipeline.manager import FUSE_MODES
from onnxmerge.search import CANDIDATE_CALIBRATION, DEFAULT_MAX_LOSS, DEFAULT_TIME_BUDGET_S, OBJECTIVES

COMMANDS = ("merge", "inspect", "eval", "calibrate", "demo", "deploy", "methods")
SWEEP_STEPS_PER_LAYER = 200  # --steps-per-layer's default
DEMO_TIME_BUDGET_S = 120.0  # the demo's search: the whole demo within 3 minutes on 2 cores
DEMO_CALIBRATION_STEPS = 500  # the demo's calibration budget per candidate (early stopping may end sooner)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2, as argparse does)."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="evaluation data per task (.npz, MNIST IDX folder, WAV folder); repeatable")
    p.add_argument("--report", metavar="JSON", help="also write the report as JSON")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--latency-budget", type=float, default=2.0, metavar="S",
                   help="seconds of timing per latency setting (default 2)")


def _calib_args(p: argparse.ArgumentParser, required: bool) -> None:
    from onnxmerge.calibration.calibrate import CalibrationConfig

    d = CalibrationConfig()
    g = p.add_argument_group("calibration (fine-tuning against the original models; needs PyTorch)")
    g.add_argument("--calib", action="append", default=[], required=required, metavar="TASK=PATH",
                   help="calibration data per task (labels optional); repeatable" +
                   ("" if required else "; given, the merged model is calibrated as the last step"))
    # --steps and --patience default to None: a search calibrates each candidate on a smaller budget
    g.add_argument("--steps", type=int,
                   help=f"most optimizer steps, all tasks together; early stopping may end sooner (default {d.steps}; "
                        f"{CANDIDATE_CALIBRATION.steps} per candidate of a merge's search, --max-loss)")
    g.add_argument("--lr", type=float, default=d.lr,
                   help=f"Adam's peak learning rate (warmup, then cosine to 0 at --steps; default {d.lr})")
    g.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help=f"early stopping: score a held-out part of --calib every N steps, keep the best weights "
                        f"(0: off; on when --steps >= 3 N; default {d.eval_every})")
    g.add_argument("--patience", type=int, metavar="N",
                   help=f"early stopping: stop after N evaluations without improvement (default {d.patience}; "
                        f"{CANDIDATE_CALIBRATION.patience} per candidate of a merge's search, --max-loss)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    g.add_argument("--layer-loss-weight", type=float, default=d.layer_loss_weight,
                   help=f"weight of the per-layer L1 output loss (default {d.layer_loss_weight})")
    g.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help=f"weight of the soft-target distillation loss (default {d.distill_weight})")
    g.add_argument("--temperature", type=float, default=d.temperature, help=f"distillation temperature (default {d.temperature})")
    g.add_argument("--no-labels", action="store_true", help="label-free calibration even where the data has labels")
    g.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    g.add_argument("--device", default=d.device, help="cpu or cuda (default cpu)")
    g.add_argument("--checkpoint", metavar="PATH",
                   help="where calibration saves its state, every --checkpoint-every steps and when interrupted "
                        "(Ctrl-C, SIGTERM); removed once the calibrated model is written (default OUTPUT.ckpt)")
    g.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, metavar="N",
                   help=f"steps between checkpoints (default {CHECKPOINT_EVERY})")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted calibration from its checkpoint (same inputs and settings; "
                        "the result equals an uninterrupted run)")


def _method_args(p: argparse.ArgumentParser) -> None:
    """One flag per method parameter, generated from the registry (a new method touches one place)."""
    seen = set()
    for m in METHODS.values():
        if not m.options:
            continue
        g = p.add_argument_group(f"method {m.name}")
        for key, opt in m.options.items():
            if key in seen:
                continue
            seen.add(key)
            shown = "" if opt.default in (None, "") else f" (default {opt.default})"
            g.add_argument(f"--{key.replace('_', '-')}", dest=f"param_{key}", default=None, type=opt.parse,
                           choices=opt.choices, metavar=None if opt.choices else key.upper(),
                           help=opt.help + shown)


def _method_params(args) -> dict:
    """The method parameters the user gave (the method's defaults fill in the rest)."""
    return {k[len("param_"):]: v for k, v in vars(args).items() if k.startswith("param_") and v is not None}


def _checkpoint(args, files: list):
    """The calibration checkpoint of this command (default OUTPUT.ckpt), checked before any work:
    not one of `files`, not there unless --resume, there with it."""
    from onnxmerge.calibration.calibrate import Checkpoint
    from onnxmerge.model.saving import check_output_path

    if not args.calib:  # its flags without --calib are refused by _check_merge_flags
        return None
    path = Path(args.checkpoint or f"{args.output}.ckpt")
    check_output_path(path, [*files, args.output])
    return Checkpoint(path, args.checkpoint_every, args.resume).validate()


def _calib_config(args, searching: bool = False):
    """The calibration settings of the command line; where --steps or --patience is not given, a
    search's per-candidate budget (searching) or a plain calibration's."""
    from onnxmerge.calibration.calibrate import CalibrationConfig

    d = CANDIDATE_CALIBRATION if searching else CalibrationConfig()
    return CalibrationConfig(steps=d.steps if args.steps is None else args.steps, lr=args.lr,
                             batch_size=args.batch_size, eval_every=args.eval_every,
                             patience=d.patience if args.patience is None else args.patience,
                             layer_loss_weight=args.layer_loss_weight, distill_weight=args.distill_weight,
                             temperature=args.temperature, use_labels=not args.no_labels, seed=args.seed,
                             device=args.device).validate()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command; the merge command's method flags come from the methods' options."""
    parser = _Parser(prog="onnxmerge", description="Merge well-trained ONNX networks into one multi-task model.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{merge,inspect,eval,calibrate,demo,deploy,methods}")

    p = sub.add_parser("merge", help="merge models (the default command: 'onnxmerge a.onnx b.onnx -o m.onnx')")
    p.add_argument("inputs", nargs="+", metavar="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, metavar="MERGED.onnx")
    p.add_argument("--method", default="auto", choices=["auto", *METHODS],
                   help="merging method (see 'onnxmerge methods'); auto: the budgeted search where labelled --calib data is "
                        f"given (--max-loss), else {BASELINE}")
    p.add_argument("--names", help="comma-separated task names (default: the input file names)")
    p.add_argument("--separate-inputs", action="store_true", help="one input per task even when they agree")
    p.add_argument("--align", metavar="PAIRS", help="layer mapping between the first two models, e.g. 0=0,1=2")
    p.add_argument("--opset", type=int, help="target opset for all models (default: the highest among them)")
    p.add_argument("--target-opset", type=int, metavar="N",
                   help="write the merged model at opset N (and its IR version) for an older runtime, checked "
                        "against the model as merged; refused in one line where its operators cannot go there")
    p.add_argument("--verify", action="store_true", help="check invariants and exactness after every pass")
    p.add_argument("--dump-dir", metavar="DIR", help="save the model after each pass that changed it")
    p.add_argument("--fuse-branches", choices=FUSE_MODES,
                   help="run the tasks' parallel layers of one shape as one grouped layer (the same outputs to float "
                        "rounding): on (default; with --max-loss and --objective latency: auto), off, or auto = "
                        "where the whole model runs faster so, 3x3 and 5x5 convolutions grouped too where faster "
                        "still (timed here, batch 1, one thread)")
    _method_args(p)
    p.add_argument("--validation", action="append", default=[], metavar="TASK=PATH",
                   help="labelled held-out data per task for a method's choices (see --tolerance), data the models were not trained on "
                        "(default: a fifth of --calib is held out, at most 1,000 samples per task, 2,000 for --max-loss's "
                        "search); repeatable")
    g = p.add_argument_group("merging to an accuracy budget (searches methods and their settings; needs --calib)")
    g.add_argument("--max-loss", type=float, metavar="P",
                   help="points of accuracy each task may lose on held-out data; search for the smallest (or "
                        f"fastest) model within it (the default with --method auto and --calib: {DEFAULT_MAX_LOSS:g}). "
                        "With a --method, search only that method's settings")
    g.add_argument("--objective", choices=OBJECTIVES, default="size",
                   help="what the search minimises within the budget: size (stored bytes) or latency "
                        "(batch 1, one thread, on this machine); default size")
    g.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S, metavar="S",
                   help=f"seconds after which the search starts no new trial (default {DEFAULT_TIME_BUDGET_S:g})")
    g.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="search up to N methods at once in worker processes (default 1); on several machines, "
                        "run the command under torchrun instead: each process takes a share of the methods")
    g = p.add_argument_group("progressive sharing, layer after layer (methods with a layer count: "
                              + ", ".join(m.name for m in METHODS.values() if m.sweep) + ")")
    g.add_argument("--sweep", action="store_true",
                   help="share layers 1, 2, ... one at a time, calibrating after each; writes "
                        "OUTPUT_share<K>.onnx per step and OUTPUT_sweep.{json,md,png}")
    g.add_argument("--steps-per-layer", type=int, default=SWEEP_STEPS_PER_LAYER,
                   help=f"calibration steps after each layer (default {SWEEP_STEPS_PER_LAYER})")
    g.add_argument("--keep", metavar="K,K", help="write only these steps' models (default: all)")
    g.add_argument("--sweep-to", type=int, metavar="K", help="stop after sharing K layers (default: all but the heads)")
    _report_args(p)
    _calib_args(p, required=False)
    _common(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("inspect", help="print the layer view of a model, and the alignment of two")
    p.add_argument("inputs", nargs="+", metavar="MODEL.onnx")
    p.add_argument("--align", metavar="PAIRS", help="check a user mapping, e.g. 0=0,1=2")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="evaluate a merged model against its originals")
    p.add_argument("model", metavar="MERGED.onnx")
    p.add_argument("--original", action="append", default=[], metavar="TASK=PATH",
                   help="original model per task (default: the source path recorded in the model, if unchanged)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the text report")
    _report_args(p)
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="fine-tune a merged model against its originals "
                                         "(torchrun --standalone --nproc_per_node=N -m onnxmerge calibrate ... runs it data-parallel)")
    p.add_argument("model", metavar="MERGED.onnx")
    p.add_argument("-o", "--output", required=True, metavar="CALIBRATED.onnx")
    p.add_argument("--original", action="append", default=[], metavar="TASK=PATH",
                   help="original model per task (default: the source path recorded in the model, if unchanged)")
    _report_args(p)
    _calib_args(p, required=True)
    _common(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("demo", help="merge the shipped example models and print the report")
    p.add_argument("-o", "--out-dir", default="onnxmerge-demo", metavar="DIR",
                   help="where to write the merged model and report (default ./onnxmerge-demo)")
    p.add_argument("--method", default="auto", choices=["auto", *METHODS],
                   help=f"auto: search every method that applies; M: only M's settings; {BASELINE}: a plain merge")
    p.add_argument("--max-loss", type=float, default=DEFAULT_MAX_LOSS, metavar="P",
                   help=f"points of accuracy each task may lose (default {DEFAULT_MAX_LOSS:g})")
    p.add_argument("--time-budget", type=float, default=DEMO_TIME_BUDGET_S, metavar="S",
                   help=f"seconds of search (default {DEMO_TIME_BUDGET_S:g})")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--latency-budget", type=float, default=2.0, metavar="S")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("deploy", help="write what a board needs to run a merged model: the model, the kernel "
                                      "library, its operator list, run.py / run.cc")
    p.add_argument("model", metavar="MERGED.onnx")
    p.add_argument("-o", "--out-dir", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--arch", default=None, metavar="ARCH",
                   help="the board's CPU architecture: x86_64 or aarch64 (default: this machine's); "
                        "another one's kernel library is cross-compiled (kernels/build.py --target)")
    p.add_argument("--ort-format", action="store_true",
                   help="also write model.ort with onnxruntime's converter (minimal and mobile builds)")
    p.add_argument("--emit", choices=["gather"],
                   help="gather: the portable form, standard operators only (for boards that cannot load custom ops)")
    _common(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("methods", help="list the merging methods")
    _common(p)
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `onnxmerge` command: returns the exit status (0, 1 for a failure, 2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "merge")
    debug = "--debug" in argv
    previous = _catch_sigterm()
    try:
        args = build_parser().parse_args(argv)
        if not args.command:
            build_parser().print_help()
            return 2
        return args.func(args) or 0
    except OnnxMergeError as e:
        if debug:
            raise
        print(f"onnxmerge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated): every temporary file is gone by now
        print("onnxmerge: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except Exception as e:  # a bug: still one line by default, the traceback with --debug
        if debug:
            raise
        print(f"onnxmerge: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that the cleanup of temporary files runs (Python's
    default action for SIGTERM ends the process at once, without `finally` blocks)."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def _catch_sigterm():
    """Turn SIGTERM into `Terminated` while the command runs; returns the handler to restore
    (None where no handler can be set: outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated) or signal.SIG_DFL


def cmd_merge(args) -> int:
    """`onnxmerge a.onnx b.onnx -o merged.onnx`: merge, then print (and with --report write) the report."""
    from onnxmerge.api import merge

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    _check_merge_flags(args)
    _check_report_path(args, [*args.inputs, args.output, *_data_files(args)])
    if not args.sweep:  # the model must not overwrite a data file either (the sweep checks its own outputs)
        from onnxmerge.model.saving import check_output_path

        check_output_path(args.output, [*args.inputs, *_data_files(args)])
    data = _load_data(args.data)  # refuse bad data before any work
    calib = _load_data(args.calib)
    validation = _load_data(args.validation)
    searching = not args.sweep and _searching(args, calib)
    config = _calib_config(args, searching) if calib else None
    if args.sweep:
        return _sweep(args, names, data, calib, config)
    if searching:
        return _search(args, names, data, calib, validation, config)
    checkpoint = _checkpoint(args, args.inputs)
    # a native form that this machine cannot run is written in its portable form (with a warning)
    result = merge(args.inputs, args.output, method=args.method, names=names,
                   separate_inputs=args.separate_inputs, align=args.align, opset=args.opset,
                   verify_passes=args.verify, dump_dir=args.dump_dir, progress=not args.quiet, data=data,
                   calib=calib, calibration=config, validation=validation, params=_method_params(args),
                   checkpoint=checkpoint, portable_fallback=True, target_opset=args.target_opset,
                   fuse_branches=args.fuse_branches or "on")
    for warning in result.state.warnings:
        print(f"onnxmerge: warning: {warning}", file=sys.stderr)
    # a merged input's tasks are compared with its sub-models, as the merge compared them
    merged = result.state.base.names if result.state.base else []
    # and a task whose file loading modernised (model.upgrade), with the graph it was merged from
    originals = {t.name: t.original if t.name in merged or t.modernised else str(t.path) for t in result.state.tasks}
    model, info = result.model, result.info
    del result  # the merge state holds every model and graph: free it before the report loads the originals
    if args.method == "auto":  # after the merge: a failure's error stays one line
        why = "without --calib data" if not calib else "without labelled --calib data for every task"
        print(f"note: --method auto {why} merges with {BASELINE}, which shares nothing: give labelled "
              "--calib TASK=PATH (and --max-loss P) to search for a smaller model within an accuracy budget")
    _print_report(model, args.output, info, originals, data, args)
    return 0


def _searching(args, calib: dict | None = None) -> bool:
    """Whether the merge command searches (onnxmerge.search): with --max-loss, or with --method auto
    and labelled --calib data (accuracy is what the budget is measured in)."""
    if args.max_loss is not None:
        return True
    if args.method != "auto" or not args.calib:
        return False
    if calib is None:  # before the data is read: as if it has labels
        return True
    from onnxmerge.api import task_names

    names = task_names([Path(p) for p in args.inputs], args.names.split(",") if args.names else None)
    # every task needs labelled data to be measured on: otherwise the data calibrates a pack merge
    return all(calib.get(n) is not None and calib[n].y is not None for n in names)


def _check_merge_flags(args) -> None:
    """Refuse flags that would be silently ignored: the sweep's flags without --sweep, calibration
    settings without --calib (a setting counts as given where it differs from its default)."""
    from onnxmerge.calibration.calibrate import CalibrationConfig

    if not args.sweep:
        sweep_only = [flag for flag, given in (("--keep", args.keep is not None),
                                               ("--sweep-to", args.sweep_to is not None),
                                               ("--steps-per-layer", args.steps_per_layer != SWEEP_STEPS_PER_LAYER))
                      if given]
        if sweep_only:
            raise UsageError(f"{', '.join(sweep_only)}: only with --sweep (progressive sharing)")
    searching = _searching(args)  # before the data is read: as if --calib has labels
    if not searching:
        search_only = [flag for flag, given in (("--objective", args.objective != "size"),
                                                ("--time-budget", args.time_budget != DEFAULT_TIME_BUDGET_S),
                                                ("--jobs", args.jobs != 1))
                       if given]
        if search_only:
            raise UsageError(f"{', '.join(search_only)}: only with --max-loss (merging to an accuracy budget)")
    measured = [(m.name, m.validation) for m in METHODS.values() if m.validation]
    if args.validation and not searching and all(getattr(args, f"param_{option}") is None for _, option in measured):
        flags = " or ".join(f"--method {name} --{option.replace('_', '-')}" for name, option in measured)
        raise UsageError(f"--validation: only with {flags} (the held-out data its choices are measured on)")
    if not args.calib:
        d = CalibrationConfig()
        settings = {"--steps": (args.steps, None), "--lr": (args.lr, d.lr),
                    "--eval-every": (args.eval_every, d.eval_every), "--patience": (args.patience, None),
                    "--batch-size": (args.batch_size, d.batch_size),
                    "--layer-loss-weight": (args.layer_loss_weight, d.layer_loss_weight),
                    "--distill-weight": (args.distill_weight, d.distill_weight),
                    "--temperature": (args.temperature, d.temperature), "--seed": (args.seed, d.seed),
                    "--device": (args.device, d.device), "--no-labels": (args.no_labels, False),
                    "--checkpoint": (args.checkpoint, None), "--resume": (args.resume, False),
                    "--checkpoint-every": (args.checkpoint_every, CHECKPOINT_EVERY)}
        given = [flag for flag, (value, default) in settings.items() if value != default]
        if given:
            raise UsageError(f"{', '.join(given)}: calibration settings, but no --calib TASK=PATH is given")


def _data_files(args) -> list[str]:
    """The files and folders named by --data, --calib and --validation (none of them may be overwritten)."""
    from onnxmerge.data import parse_task_paths

    return [*parse_task_paths(getattr(args, "data", [])).values(), *parse_task_paths(getattr(args, "calib", [])).values(),
            *parse_task_paths(getattr(args, "validation", [])).values()]


def _sweep(args, names, data, calib, config) -> int:
    from onnxmerge.model.saving import check_output_path
    from onnxmerge.sweep import sweep, sweep_markdown, write_sweep

    method = get_method(args.method)
    sweepable = [m.name for m in METHODS.values() if m.sweep]
    if method.sweep is None:
        raise UsageError(f"--sweep is progressive sharing, layer after layer: give --method {' or '.join(sweepable)}")
    params = _method_params(args)
    if method.sweep in params:
        raise UsageError(f"--sweep shares 1, 2, ... layers in turn: leave out --{method.sweep}")
    ignored = [flag for flag, given in (("--separate-inputs", args.separate_inputs), ("--align", args.align),
                                        ("--opset", args.opset), ("--verify", args.verify),
                                        ("--target-opset", args.target_opset),
                                        ("--dump-dir", args.dump_dir), ("--report", args.report),
                                        ("--no-latency", args.no_latency), ("--resume", args.resume),
                                        ("--checkpoint", args.checkpoint)) if given]
    if ignored:
        raise UsageError(f"--sweep does not take {', '.join(ignored)} (it writes its own table and measures speed)")
    if not calib:
        raise UsageError("--sweep calibrates after each shared layer: give --calib TASK=PATH for the tasks")
    check_output_path(args.output, args.inputs)
    try:
        keep = [int(k) for k in args.keep.split(",")] if args.keep else None
    except ValueError:
        raise UsageError(f"--keep {args.keep}: give layer counts like 2,4") from None
    rows = sweep(method, args.inputs, names, calib, data, steps_per_layer=args.steps_per_layer,
                 calibration=config, params=params, latency_budget_s=args.latency_budget,
                 up_to=args.sweep_to, progress=not args.quiet, fuse_branches=args.fuse_branches or "on")
    written = write_sweep(rows, args.output, keep)
    print(sweep_markdown([{k: v for k, v in r.items() if k != "model"} for r in rows]))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _search(args, names, data, calib, validation, config) -> int:
    """`--max-loss P` (or `--method auto` with --calib): search methods and settings for the smallest
    (or fastest) model within the budget; write it, the search's report beside it, and its report."""
    from onnxmerge.api import check_writable
    from onnxmerge.search import report as search_report
    from onnxmerge.search.run import save, search

    check_writable(args.output)  # before the search's minutes, not after

    ignored = [flag for flag, given in (("--separate-inputs", args.separate_inputs), ("--align", args.align),
                                        ("--opset", args.opset), ("--verify", args.verify),
                                        ("--dump-dir", args.dump_dir), ("--resume", args.resume),
                                        ("--checkpoint", args.checkpoint)) if given]
    if ignored:
        raise UsageError(f"--max-loss does not take {', '.join(ignored)} (it merges many candidates)")
    if args.objective == "latency" and args.no_latency:
        raise UsageError("--objective latency measures latency: leave out --no-latency")
    methods = None if args.method == "auto" else [args.method]
    result = search(args.inputs, names, calib, validation=validation,
                    max_loss=DEFAULT_MAX_LOSS if args.max_loss is None else args.max_loss,
                    objective=args.objective, time_budget_s=args.time_budget, methods=methods,
                    params=_method_params(args), calibration=config, measure_latency=not args.no_latency,
                    jobs=args.jobs, progress=not args.quiet, fuse_branches=args.fuse_branches)
    if int(os.environ.get("RANK", "0")):
        return 0  # under torchrun, rank 0 writes what every process found
    path = save(result, args.output, args.target_opset)
    chosen, originals = result.chosen, result.originals
    test = None
    if data:
        from onnxmerge.measure.evaluate import evaluate

        test = evaluate(chosen.model, chosen.info, data, originals, progress=False)
    written = search_report.write(result, args.output, test)
    print(search_report.markdown(result))
    print("wrote " + ", ".join(str(p) for p in [path, *written]) + "\n")
    _print_report(chosen.model, path, chosen.info, originals, data, args)
    return 0


def cmd_calibrate(args) -> int:
    """`onnxmerge calibrate merged.onnx -o out.onnx --calib ...`: fine-tune a merged model against its originals."""
    from onnxmerge.api import check_merged_data, check_writable
    from onnxmerge.calibration.calibrate import (
        calibrate,
        config_dict,
        init_distributed,
        record_calibration,
    )
    from onnxmerge.measure.evaluate import evaluate
    from onnxmerge.model.contract import write_metadata
    from onnxmerge.model.saving import check_output_path, save_atomic
    from onnxmerge.pipeline.checks import validate_output

    config = _calib_config(args)
    path, model, info, originals = _open_merged(args)
    check_output_path(args.output, [path, *originals.values(), *_data_files(args)])
    check_writable(args.output)
    _check_report_path(args, [path, args.output, *originals.values(), *_data_files(args)])
    checkpoint = _checkpoint(args, [path, *originals.values()])
    calib = _load_data(args.calib)
    data = _load_data(args.data)
    check_merged_data(model, info, calib, flag="--calib")  # before any work: shapes, types, labels
    check_merged_data(model, info, data)
    rank, world = init_distributed(config.device)
    before = evaluate(model, info, data, progress=False) if data and rank == 0 else None
    result = calibrate(model, info, originals, calib, config, progress=not args.quiet and rank == 0,
                       checkpoint=checkpoint)
    if rank != 0:
        return 0  # one writer: the first process
    record_calibration(info, config, result)
    info.fidelity["output_check"] = validate_output(result.model, info, originals, where=str(args.output))
    write_metadata(result.model, info)
    save_atomic(result.model, args.output)
    checkpoint.remove()  # only now: a kill before the model is saved leaves the checkpoint to resume from
    _print_report(result.model, args.output, info, originals, data, args,
                  extra={"calibration": {"config": config_dict(config), "summary": result.summary(),
                                         "before": before}})
    return 0


def cmd_inspect(args) -> int:
    """`onnxmerge inspect a.onnx [b.onnx]`: the layer view of each model and their alignment."""
    import onnx

    from onnxmerge.api import load_tasks
    from onnxmerge.graph.alignment import format_alignment, parse_pairs
    from onnxmerge.graph.layers import format_layers, layer_label, table
    from onnxmerge.model import downgrade
    from onnxmerge.passes import BASELINE, METHODS
    from onnxmerge.passes.common import AlignLayersPass, normalise_passes
    from onnxmerge.pipeline.manager import PassManager

    pairs = parse_pairs(args.align) if args.align else None
    state = PassManager([*normalise_passes(), AlignLayersPass(pairs)]).run(load_tasks(args.inputs))
    first = state.tasks[0]
    alignments = list(zip(state.alignments, state.tasks[1:]))
    explained = {t.name: {m.name: m.explain(t.graph, t.layers) for m in METHODS.values() if m.explain and t.layers}
                 for t in state.tasks}
    # what a runtime needs, of each file as it is on disk (loading may have converted it)
    needs = {t.name: downgrade.versions(onnx.load(str(t.path), load_external_data=False)) for t in state.tasks}
    if args.json:
        print(json.dumps({"models": {t.name: {"path": str(t.path), "layers": [l.to_dict() for l in t.layers],
                                              "methods": explained[t.name], "runtime": needs[t.name]}
                                     for t in state.tasks},
                          "alignments": [al.to_dict() for al, _ in alignments],
                          "notes": state.notes}, indent=2))
        return 0
    for t in state.tasks:
        v = needs[t.name]
        custom = "".join(f", custom domain {d} v{n} (needs its kernels)" for d, n in v["custom_domains"].items())
        print(f"{t.path} (task {t.name}): {len(t.layers)} layers; file: opset {v['opset']}, IR version "
              f"{v['ir_version']}{custom}; runs on onnxruntime {v['oldest_onnxruntime']} or newer"
              + ("" if state.opset == v["opset"] else f" (merged at opset {state.opset})"))
        print(format_layers(t.layers))
        if explained[t.name]:
            methods = list(explained[t.name])
            print(f"\nWhat each method does with these layers (at its defaults; {BASELINE} carries every layer as it is):")
            print(table([("#", "name", *methods)] + [(str(l.index), layer_label(t.layers, l.index),
                                                       *(explained[t.name][m][l.index] for m in methods))
                                                      for l in t.layers]))
        print()
    for note in state.notes:
        print(f"note: {note}")
    for al, other in alignments:
        print(format_alignment(al, first.layers, other.layers))
    return 0


def cmd_eval(args) -> int:
    """`onnxmerge eval merged.onnx --data ...`: the report of a merged model against its originals."""
    from onnxmerge.api import check_merged_data

    path, model, info, originals = _open_merged(args)
    _check_report_path(args, [path, *originals.values(), *_data_files(args)])
    data = _load_data(args.data)
    check_merged_data(model, info, data)
    report = _print_report(model, path, info, originals, data, args, quiet_text=args.json)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    """`onnxmerge demo`: merge the shipped example models to an accuracy budget with their shipped
    calibration subsets (the search's table, then the chosen model's report on the eval subsets);
    `--method M` searches only M's settings (pack: a plain merge)."""
    from importlib.resources import files

    examples = files("onnxmerge.examples")
    meta = json.loads((examples / "models.json").read_text())
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = meta["models"]  # the task names: fashion_lenet, digits_lenet
    output = out_dir / "merged.onnx"
    argv = ["merge", *[str(examples / m["file"]) for m in tasks.values()], "-o", str(output),
            "--names", ",".join(tasks), "--method", args.method, "--report", str(out_dir / "report.json"),
            "--latency-budget", str(args.latency_budget)]
    argv += [f"--data={name}={examples / m['eval_file']}" for name, m in tasks.items()]
    if args.method != BASELINE:
        argv += [f"--calib={name}={examples / m['eval_file'].replace('_eval', '_calib')}" for name, m in tasks.items()]
        argv += ["--max-loss", str(args.max_loss), "--time-budget", str(args.time_budget),
                 "--steps", str(DEMO_CALIBRATION_STEPS)]
    argv += ["--no-latency"] * args.no_latency + ["-q"] * args.quiet
    how = f"with {BASELINE}" if args.method == BASELINE else f"to a budget of {args.max_loss:g} point(s) per task"
    print(f"onnxmerge demo: merging {', '.join(m['file'] for m in tasks.values())} {how} into {output}")
    code = cmd_merge(build_parser().parse_args(argv))
    print(f"\nwrote {output} and {out_dir / 'report.json'}")
    return code


def cmd_deploy(args) -> int:
    """`onnxmerge deploy merged.onnx -o DIR`: the files a board needs, and what it needs installed."""
    from onnxmerge.deploy import deploy

    print(deploy(args.model, args.out_dir, arch=args.arch, ort_format=args.ort_format, emit=args.emit).summary())
    return 0


def cmd_methods(args) -> int:
    """`onnxmerge methods`: every registered method, its paper and its defaults."""
    for m in METHODS.values():
        defaults = ", ".join(f"{k}={v}" for k, v in m.defaults.items()) or "no parameters"
        print(f"{m.name}: {m.summary}\n    paper: {m.paper}\n    {defaults}; exact: {'yes' if m.exact else 'no'}")
    return 0


def _load_data(items: list[str]) -> dict:
    from onnxmerge.data import load_dataset, parse_task_paths

    return {task: load_dataset(p) for task, p in parse_task_paths(items).items()}


def _open_merged(args):
    """A merged model given on the command line: (path, model, metadata, original model per task)."""
    path = Path(args.model)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    model = _load_any(path)
    info = read_metadata(model, str(path))
    return path, model, info, _find_originals(info, args.original, path)


def _check_report_path(args, files: list) -> None:
    """--report must not overwrite a model and its folder must exist: checked before any work."""
    from onnxmerge.model.saving import check_output_path

    if getattr(args, "report", None):
        check_output_path(args.report, [f for f in files if f])


def _find_originals(info, given: list[str], path: Path) -> dict[str, str]:
    """The original model of every task: --original TASK=PATH, else the recorded source if unchanged."""
    from onnxmerge.data import parse_task_paths
    from onnxmerge.model.loading import as_loaded, file_sha256

    originals = parse_task_paths(given)
    names = [t.name for t in info.tasks]
    for task, file in originals.items():
        if task not in names:
            raise UsageError(f"--original {task}=...: no task named {task!r} in {path} (tasks: {', '.join(names)})")
        if not Path(file).is_file():
            raise UsageError(f"--original {task}={file}: no such file")
    for t in info.tasks:
        if t.name not in originals and Path(t.source).is_file() and file_sha256(t.source) == t.sha256:
            originals[t.name] = t.source
    missing = [t.name for t in info.tasks if t.name not in originals]
    if missing:
        raise UsageError(f"{path}: original model of task(s) {', '.join(missing)} not found (the recorded "
                         "source is missing or changed): give --original TASK=PATH")
    # an original written the old way runs as the merge loaded it (a fixed batch dim freed, ...)
    return {task: as_loaded(file) for task, file in originals.items()}


def _load_any(path: Path):
    import onnx

    from onnxmerge.errors import MergeError

    try:
        return onnx.load(str(path))
    except Exception as e:
        raise MergeError(f"{path}: not an ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _print_report(model, path, info, originals: dict, data: dict, args, quiet_text: bool = False,
                  extra: dict | None = None) -> dict:
    """Build, print and (with --report) write the report of a merged model."""
    from onnxmerge.api import baseline_model
    from onnxmerge.measure.report import build_report, format_report, write_report_json

    side_by_side = None
    latency = not args.no_latency
    if latency and info.method != BASELINE and all(isinstance(m, str) for m in originals.values()):
        side_by_side = baseline_model([originals[t.name] for t in info.tasks], [t.name for t in info.tasks])
    report = build_report(merged_model=model, merged_path=path, info=info, originals=originals,
                          pack_model=side_by_side, data=data, latency=latency,
                          latency_budget_s=args.latency_budget, progress=not args.quiet)
    report.update(extra or {})
    if not quiet_text:
        print(format_report(report))
    if getattr(args, "report", None):
        write_report_json(report, args.report)
    return report
