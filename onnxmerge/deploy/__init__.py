"""What a board needs to run a merged model: `onnxmerge deploy merged.onnx -o DIR`.

DIR gets:
- `model.onnx`: the model (with `--emit gather`, its portable form: no custom ops);
- `model.ort` with `--ort-format`: onnxruntime's own converter (onnxruntime.tools.convert_onnx_models_to_ort,
  optimisations fixed for the target platform), for minimal and mobile builds;
- `libonnxmerge_kernels.so` for the target architecture, only where the model has ai.onnxmerge nodes:
  this machine's build, or one cross-compiled by kernels/build.py (`--arch aarch64`);
- `operators.config`: the operators the model uses, in the format of onnxruntime's
  `--include_ops_by_config` (from the converter where it ran: the ORT-format model's operators after
  its optimisations); a minimal build with custom ops also needs `--minimal_build custom_ops`;
- `run.py` (onnxruntime and numpy only) and `run.cc` (onnxruntime's C++ API): a session with the
  kernels registered;
- `README.txt`: what the board needs, as also printed.

The folder is assembled beside DIR and renamed into place, so it is complete or absent. Every model
written is run on this machine against the model given (where the target is this architecture or the
model needs no kernels) and must agree to 1e-5.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from onnxmerge import kernels
from onnxmerge.errors import MergeError, UsageError, first_line
from onnxmerge.graph.ops import DOMAIN, float_tables, is_native, to_portable
from onnxmerge.kernels import build
from onnxmerge.model import downgrade
from onnxmerge.model.saving import save_atomic

HERE = Path(__file__).resolve().parent
SNIPPETS = ("run.py", "run.cc")
TOLERANCE = 1e-5  # relative: the same model, or its portable form (the same numbers in stock operators)
ORT_PLATFORM = {"x86_64": "amd64", "aarch64": "arm"}  # the converter's --target_platform


@dataclass
class Deployment:
    """What `deploy` wrote, and what the board needs."""

    folder: Path
    files: list[str]
    native: bool  # the model has ai.onnxmerge nodes (and the folder the kernel library)
    arch: str
    oldest_onnxruntime: str
    checks: dict[str, float] = field(default_factory=dict)  # file -> relative difference against the model given
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The README.txt text: what is here and what the board needs."""
        lines = [f"{self.folder}: {', '.join(self.files)}",
                 f"The board needs onnxruntime {self.oldest_onnxruntime} or newer for {self.arch}"
                 + (" with custom-op support, and libonnxmerge_kernels.so (here) registered in the session"
                    if self.native else " (any build: the model uses only standard operators)") + ".",
                 "Runtime-only install on the board: pip install onnxruntime numpy; then python run.py "
                 "(no onnxmerge, PyTorch or scikit-learn needed).",
                 "A minimal onnxruntime build: --minimal_build" + (" custom_ops" if self.native else "")
                 + " --include_ops_by_config operators.config" + (" (and load model.ort)" if "model.ort" in self.files
                                                                   else "") + "."]
        if self.native:
            lines.append("Where the board cannot load custom ops (an NPU execution provider, a minimal build without "
                         "custom_ops), deploy the portable form instead: onnxmerge deploy MODEL -o DIR --emit gather "
                         "(the same numbers in standard operators, usually slower on a CPU).")
        lines += [f"checked on this machine: {name} equals the model given to {diff:.1e} (relative)"
                  for name, diff in self.checks.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def operators_config(model: onnx.ModelProto) -> str:
    """The operators `model` uses, by domain and opset, in onnxruntime's required-operators format
    (`domain;opset;Op1,Op2`), as its `--include_ops_by_config` reads it."""
    versions = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    used: dict[str, set[str]] = defaultdict(set)

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            used[node.domain or "ai.onnx"].add(node.op_type)
            for attr in node.attribute:  # subgraphs (If, Loop, Scan)
                for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(g)

    visit(model.graph)
    lines = ["# operators of the deployed model (onnxruntime --include_ops_by_config; written by onnxmerge deploy)"]
    lines += [f"{domain};{versions.get(domain, 1)};{','.join(sorted(ops))}" for domain, ops in sorted(used.items())]
    return "\n".join(lines) + "\n"


def kernel_library(arch: str, out: Path) -> Path:
    """The kernel library for `arch` in `out`: this machine's build, copied, or a cross-compiled one."""
    if arch == build.HOST:
        if not kernels.available():
            raise MergeError(f"the model has {DOMAIN} nodes, but {kernels.unavailable_reason()}; "
                             "build them, or deploy the portable form with --emit gather")
        return Path(shutil.copy2(kernels.library_path(), out / build.LIBRARY_NAME))
    if not (build.HERE / "lookup_impl.cc").is_file():
        raise MergeError(f"cross-compiling the kernels for {arch} needs onnxmerge's source tree (kernels/*.cc), "
                         "which this install lacks: install onnxmerge from a clone")
    library = build.build(out=out, target=arch)
    if library is None:
        raise MergeError(f"could not build the kernels for {arch}: {first_line(Exception(build.last_reason))}")
    return library


def convert_to_ort(model_path: Path, arch: str, library: Path | None, out: Path) -> Path:
    """onnxruntime's converter: `model.ort` (fixed optimisations for `arch`) and its operator list,
    which replaces operators.config (the ORT model's operators after those optimisations)."""
    work = Path(tempfile.mkdtemp(prefix="onnxmerge-ort-"))
    try:
        shutil.copy2(model_path, work / model_path.name)
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work / model_path.name),
               "--output_dir", str(work / "out"), "--optimization_style", "Fixed",
               "--target_platform", ORT_PLATFORM.get(arch, "arm")]
        if library is not None:
            cmd += ["--custom_op_library", str(library)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        converted = work / "out" / model_path.with_suffix(".ort").name
        if done.returncode != 0 or not converted.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()
            raise MergeError(f"{model_path.name}: onnxruntime's ORT-format converter failed: "
                             f"{tail[-1] if tail else f'exit {done.returncode}'}")
        shutil.move(converted, out / "model.ort")
        config = next((work / "out").glob("*required_operators*.config"), None)
        if config is not None:  # its header names the converter's temporary copy: name the file deployed
            lines = [line for line in config.read_text().splitlines() if not line.startswith("# - ")]
            (out / "operators.config").write_text("\n".join(
                ["# operators of model.ort (onnxruntime --include_ops_by_config; written by its converter)",
                 *(line for line in lines if not line.startswith("#"))]) + "\n")
        return out / "model.ort"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def deploy(model_path: str | Path, out_dir: str | Path, *, arch: str | None = None, ort_format: bool = False,
           emit: str | None = None) -> Deployment:
    """Write what a board needs to run the model at `model_path` into the new folder `out_dir`.

    arch: the board's CPU architecture (default this machine's); emit: "gather" writes the portable
    form (no custom ops), None keeps the model's form."""
    from onnxmerge.model.runtime import session
    from onnxmerge.pipeline.checks import output_difference

    model_path, out_dir = Path(model_path), Path(out_dir)
    arch = arch or build.HOST
    if arch not in build.ARCHES:
        raise UsageError(f"--arch {arch}: not one of {', '.join(build.ARCHES)}")
    if emit not in (None, "gather"):
        raise UsageError(f"--emit {emit}: deploy writes the model as it is, or with --emit gather its portable form")
    if not model_path.is_file():
        raise UsageError(f"{model_path}: no such file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir}: exists and is not an empty folder; give a new one")
    try:
        given = onnx.load(str(model_path))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise MergeError(f"{model_path}: not an ONNX model ({first_line(e)})") from None
    model, notes, reference = given, [], given  # reference: what the written models must compute
    if emit == "gather" and is_native(given):
        model = to_portable(given)
        notes.append(f"--emit gather: the {DOMAIN} nodes were replaced by their portable form")
        reference = float_tables(given)
        if reference != given:
            notes.append("--emit gather: the portable form computes fp32 lookup tables, not the merged model's "
                         "integer tables (--table-precision): checked against the merged model's numbers with fp32 "
                         "tables")
    native = is_native(model)
    # standard operators run anywhere; native nodes here only in this machine's kernels (which
    # kernel_library requires for this architecture)
    runs_here = not native or arch == build.HOST

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # a folder as mkdir makes it, not mkdtemp's private one
    try:
        saved = save_atomic(model, work / "model.onnx")
        (work / "operators.config").write_text(operators_config(model))
        if native:
            kernel_library(arch, work)
        if ort_format:
            host_library = kernels.library_path() if native else None
            if native and host_library is None:
                raise MergeError(f"--ort-format: converting a model with {DOMAIN} nodes loads them in this machine's "
                                 f"kernels, but {kernels.unavailable_reason()}")
            convert_to_ort(saved, arch, host_library, work)
        for name in SNIPPETS:
            shutil.copy2(HERE / name, work / name)
        checks = {}
        if ort_format and (grown := (work / "model.ort").stat().st_size / saved.stat().st_size) > 1.5:
            notes.append(f"model.ort is {grown:.1f}x the size of model.onnx: onnxruntime's converter folds constant "
                         "subgraphs (the portable form's codebook lookups) into dense weights; model.onnx keeps them")
        if runs_here:
            checks["model.onnx"] = output_difference(onnx.load(str(saved)), reference)
        elif native:
            notes.append(f"not run here: the kernels are for {arch}; run.py on the board runs them")
        if ort_format and runs_here:
            ort_session = session(work / "model.ort", optimize=True, native=native)
            checks["model.ort"] = output_difference(ort_session, reference)
        for name, diff in checks.items():
            if not diff <= TOLERANCE:
                raise MergeError(f"{name}: its outputs differ from {model_path.name}'s by {diff:.3g} (> {TOLERANCE:g})")
        files = sorted([*(p.name for p in work.iterdir()), "README.txt"])
        deployment = Deployment(out_dir, files, native, arch, downgrade.oldest_onnxruntime(model), checks, notes)
        (work / "README.txt").write_text(deployment.summary() + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        work.rename(out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return deployment

