"""Loading and checking input models, and reconciling their IR and opset versions.

Every input goes through `load_model`: it must exist, parse as ONNX (external data is loaded from
beside the file), be stamped with an IR version and opset that onnxruntime runs, pass `onnx.checker`,
use operators of domains onnxruntime runs, hold only finite weights, take inputs of fixed sample
shape with a batch dim that is free (or is made free: onnxmerge.model.upgrade; where it cannot be,
the model keeps its fixed batch and the merge runs at it), survive shape inference and run in
onnxruntime. Each failure is one `MergeError` that names the file and, for
operators, inputs and weights, every offending node, input or initializer.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import version_converter
from onnx.external_data_helper import load_external_data_for_model

from onnxmerge.errors import MergeError, UsageError, first_line
from onnxmerge.kernels import DOMAIN
from onnxmerge.model import upgrade
from onnxmerge.model.contract import MergedInfo, read_metadata, task_model
from onnxmerge.model.runtime import ort_error_text, ort_message, random_feeds, run_batch, session
from onnxmerge.model.saving import split_weights

DEFAULT_DOMAINS = ("", "ai.onnx")
# what onnxruntime's CPU provider runs beside the default domain; other domains are refused by name
RUNTIME_DOMAINS = (*DEFAULT_DOMAINS, "ai.onnx.ml", "com.microsoft")


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (recorded per task in the metadata)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def opset_of(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version."""
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return imp.version
    return 1


def foreign_nodes(model: onnx.ModelProto) -> list[str]:
    """'domain::OpType (node name)' for each node of a domain onnxruntime's CPU provider does not run
    (onnxmerge's own ai.onnxmerge kernels among them: a merged model's native form)."""
    return [f"{n.domain}::{n.op_type} ({n.name or f'node #{i}'})" for i, n in enumerate(model.graph.node)
            if n.domain not in RUNTIME_DOMAINS]


def load_model(path: str | Path, notes: list[str] | None = None) -> onnx.ModelProto:
    """Load, check, modernise and shape-infer one input model; a one-line MergeError if it is unusable.

    Any operator onnxruntime runs is accepted: the methods treat what is not a layer as glue. Graphs
    written the old way (IR 3, an opset below upgrade.MIN_OPSET, a fixed batch dim) are brought to
    the current form (onnxmerge.model.upgrade) and checked against the file; what was done is
    appended to `notes`, one line each."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise MergeError(f"{path}: not an ONNX model (the file does not parse: {first_line(e)})") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot read the file ({first_line(e)})") from None
    try:  # apart from the parse, so that a missing or short data file is not called a broken model
        load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as e:
        raise MergeError(f"{path}: cannot read the model's external data ({first_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise MergeError(f"{path}: not an ONNX model (empty or truncated file)")
    if not model.graph.output:
        raise MergeError(f"{path}: the graph has no outputs (nothing to merge)")
    try:
        corrupt = non_utf8_field(model)
    except UnicodeDecodeError:  # protobuf's C++ runtime decodes on access instead of handing out bytes
        corrupt = "(one of them)"
    if corrupt:
        raise MergeError(f"{path}: invalid ONNX model (text field {corrupt} is not valid UTF-8: the file is corrupt)")
    # the versions first: a model from a newer exporter fails the checker with a less useful message
    refusal = runtime_refusal(model.ir_version, opset_of(model))
    if refusal:
        raise MergeError(f"{path}: onnxruntime {_ort_version()} cannot run a model of IR version "
                         f"{model.ir_version} and opset {opset_of(model)} ({refusal})")
    check_inputs(model, str(path), fixed_batch_ok=True)
    try:
        # by path, so that models over 2 GB with external data are checked too
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise MergeError(f"{path}: invalid ONNX model ({first_line(e)})") from None
    except UnicodeDecodeError:  # the checker quotes a corrupt name or string that is not UTF-8
        raise MergeError(f"{path}: invalid ONNX model (a name or string in it is not valid UTF-8: "
                         "the file is corrupt)") from None
    foreign = foreign_nodes(model)
    if foreign:
        raise MergeError(f"{path}: operator(s) of a domain onnxruntime's CPU provider does not run: {', '.join(foreign)}"
                         + (" (a merged model's native form: merge its portable form)"
                            if any(n.domain == DOMAIN for n in model.graph.node) else ""))
    check_finite_weights(model, str(path))
    model, changed = modernise(model, path, notes if notes is not None else [])
    # a batch that modernise could not free stays fixed (every input at the same size)
    check_inputs(model, str(path), fixed_batch_ok=upgrade.fixed_batch(model) is not None)
    declared = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in model.graph.output]
    model = infer_shapes(model, str(path))  # which overwrites the declared outputs with inferred ones
    check_runs(path, declared, model if changed else None)
    return model


def as_loaded(path: str | Path) -> str | onnx.ModelProto:
    """The model at `path` as a merge loads it: the path itself where loading would leave the graph as
    it is, else the modernised model (load_model), which is what a merged task was compared with."""
    old = upgrade.written_the_old_way(onnx.load(str(path), load_external_data=False))
    return load_model(path) if old else str(path)


def modernise(model: onnx.ModelProto, path: Path, notes: list[str]) -> tuple[onnx.ModelProto, bool]:
    """A graph written the old way brought to the current form (onnxmerge.model.upgrade), and whether
    anything changed; a fixed batch dim made symbolic is proven against the file (upgrade.freed_problem).
    Where that proof fails the graph keeps its fixed batch, and the merge runs at that batch (a note
    says so and why): the graph is what the file computes, only not at other batch sizes."""
    if not upgrade.written_the_old_way(model):
        return model, False
    where = str(path)
    dropped = upgrade.drop_initializer_inputs(model)
    if dropped:
        notes.append(f"{path.name}: {dropped} initializer(s) listed as graph inputs (IR {model.ir_version}) "
                     "taken as weights")
        model.ir_version = max(model.ir_version, 4)  # IR 3 requires the initializers among the inputs
    source = opset_of(model)
    if source < upgrade.MIN_OPSET:
        model = upgrade.upgrade_opset(model, source, where)
        notes.append(f"{path.name}: converted from opset {source} to {upgrade.MIN_OPSET}")
    batch = upgrade.fixed_batch(model)
    if batch is not None:
        freed, rewritten = upgrade.free_batch(model, batch, where)
        problem = upgrade.freed_problem(path, freed, batch, where, rewritten)
        if problem is None:
            model = freed
            notes.append(f"{path.name}: fixed batch dim {batch} made symbolic"
                         + (f" (Reshape node(s) {', '.join(rewritten)} now copy the batch)" if rewritten else "")
                         + "; checked: the graph on two stacked batches equals the file's graph on each")
        else:
            if dropped or source < upgrade.MIN_OPSET:  # the conversion, checked at the batch kept
                upgrade.check_converted(path, model, batch, where)
            notes.append(f"{path.name}: the batch dim is fixed at {batch} and cannot be made symbolic ({problem}): "
                         f"the merge runs at batch {batch}")
    else:
        upgrade.check_converted(path, model, 1, where)  # the conversion
    return model, True


def check_runs(path: Path, declared: list[onnx.ValueInfoProto], model: onnx.ModelProto | None = None) -> None:
    """Refuse a model that onnxruntime cannot open, or run once on random inputs, or whose outputs on
    them are not finite, or do not follow the batch where `declared` (the file's graph outputs) gives
    them a batch dim or where evaluation and calibration read them as class scores (the first output
    of rank 2). Duplicate node names, a weight whose shape contradicts its node's attributes and the
    like pass onnx.checker and shape inference; every later step runs the inputs in onnxruntime,
    where such a failure would look like onnxmerge's own bug. By path, so that external data is found
    as the user gave it, or `model` where loading changed the graph (modernise). At batch 2, or at the
    batch a graph is fixed at (one whose batch dim could not be made symbolic)."""
    try:
        sess = session(path if model is None else model)
        # not 1, which an output could have by chance where it should follow the batch
        batch = run_batch(sess, 2)
        outputs = sess.run(None, random_feeds(sess, batch))
    except MergeError as e:  # an input onnxmerge cannot feed (graphs.input_dtype)
        raise MergeError(f"{path}: {e}") from None
    except Exception as e:  # onnxruntime raises its own Fail / InvalidArgument / ... types
        raise MergeError(f"{path}: onnxruntime cannot run this model ({ort_error_text(e)})") from None
    # finite weights can still overflow (or a BatchNormalization take the root of a negative
    # variance): a model whose outputs are not finite cannot be merged and checked against
    dims_of = {o.name: o.type.tensor_type.shape.dim for o in declared}
    scores = next((arg.name for arg, v in zip(sess.get_outputs(), outputs) if getattr(v, "ndim", 0) == 2), None)
    for arg, value in zip(sess.get_outputs(), outputs):
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise MergeError(f"{path}: the model's output {arg.name!r} is NaN or infinite on random inputs "
                             "(weights out of float range?); it cannot be merged and checked")
        # an output declared (batch, ...) must have one row per sample: evaluation and calibration
        # match its rows with the samples' labels
        dims = dims_of.get(arg.name) or []  # as the file declares it (onnxruntime reports its own inference)
        batched = (dims and not dims[0].HasField("dim_value")) or arg.name == scores
        if batched and getattr(value, "shape", (batch,))[:1] != (batch,):
            shape = "(" + ",".join(str(d) for d in value.shape) + ")"
            why = (f"is declared with a batch dim ({dims[0].dim_param or '?'})" if arg.name != scores
                   else "holds the class scores (the first output of rank 2)")
            raise MergeError(f"{path}: output {arg.name!r} {why} but has shape {shape} at batch {batch}: "
                             "it does not follow the input's batch")


def non_utf8_field(message, where: str = "model") -> str | None:
    """The first text field of a protobuf message whose bytes are not UTF-8 (a corrupt file), or None.

    ONNX's text fields are proto2 strings, which protobuf parses without checking them: the python
    runtime hands such a field out as bytes, and the first code that copies or prints it fails far
    from the file. Only text fields are looked at, so the walk costs nothing per weight value."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            if any(isinstance(v, bytes) for v in (value if field.is_repeated else [value])):
                return f"{where}.{field.name}"
        elif field.message_type is not None:
            for k, item in enumerate(value if field.is_repeated else [value]):
                found = non_utf8_field(item, f"{where}.{field.name}" + (f"[{k}]" if field.is_repeated else ""))
                if found:
                    return found
    return None


def check_inputs(model: onnx.ModelProto, where: str, fixed_batch_ok: bool = False) -> None:
    """Refuse graph inputs that onnxmerge cannot feed: not a tensor, no shape, no free batch dim
    (unless `fixed_batch_ok`: before modernise frees it, or where it could not and every input is
    fixed at one batch), or a sample dim that is not a fixed size. Every check, comparison,
    calibration and evaluation runs the model at batch sizes of its own choosing (or at its fixed
    batch: runtime.fixed_batch_of) on samples of the one shape the input declares."""
    weights = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in weights:  # an initializer listed as an input (IR < 4 habit): a weight
            continue
        t = value.type
        if not t.HasField("tensor_type"):
            raise MergeError(f"{where}: input {value.name!r} is not a tensor; onnxmerge takes tensor inputs only")
        if not t.tensor_type.HasField("shape"):
            raise MergeError(f"{where}: input {value.name!r} has no shape; onnxmerge needs the sample shape "
                             "(export the model with fixed input dims besides the batch dim)")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.tensor_type.shape.dim]
        shown = "(" + ",".join(map(str, dims)) + ")"
        if not dims:
            raise MergeError(f"{where}: input {value.name!r} is a scalar; onnxmerge needs a batch dim")
        if isinstance(dims[0], int) and not fixed_batch_ok:
            raise MergeError(f"{where}: input {value.name!r} has a fixed batch dim {dims[0]} (shape {shown}) and the "
                             "other inputs another; onnxmerge runs models at any batch size: export it with a "
                             "symbolic batch dim")
        unknown = [k for k, d in enumerate(dims[1:], start=1) if not isinstance(d, int) or d <= 0]
        if unknown:
            raise MergeError(f"{where}: input {value.name!r} has shape {shown}: dim(s) "
                             f"{', '.join(map(str, unknown))} are not fixed sizes; onnxmerge needs fixed "
                             "sample dims (only the batch dim, dim 0, may be symbolic)")


def check_finite_weights(model: onnx.ModelProto, where: str) -> None:
    """Refuse a model with a NaN or infinite weight: nothing merged from it would be finite, and the
    checks that compare the merged model with it could not tell a bug from the bad weight."""
    from onnx import numpy_helper

    tensors = [(i.name, i) for i in model.graph.initializer]
    tensors += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value" and a.HasField("t")]
    for name, tensor in tensors:
        if not np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type), np.floating):
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except ValueError as e:  # stored data of another size than the dims say (the checker lets it by)
            raise MergeError(f"{where}: weight {name!r} does not hold the data its dims "
                             f"{list(tensor.dims)} say ({first_line(e)})") from None
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise MergeError(f"{where}: weight {name!r} has {bad} NaN or infinite value(s) of {values.size}; "
                             "a model with non-finite weights cannot be merged")


@functools.lru_cache(maxsize=None)
def runtime_refusal(ir_version: int, opset: int) -> str | None:
    """Why onnxruntime refuses models stamped with this IR version and ai.onnx opset, or None.

    Asked of onnxruntime itself with an empty graph of those versions (so the answer is about the
    versions alone, not any operator), because the limits move with each onnxruntime release."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    probe = helper.make_model(helper.make_graph([], "version_probe", [x], [x]),
                              opset_imports=[helper.make_opsetid("", opset)])
    probe.ir_version = ir_version
    so = ort.SessionOptions()
    so.log_severity_level = 3  # its warnings about old opsets would be a second line on stderr
    try:
        ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        return _ort_reason(e)
    return None


def _ort_reason(e: BaseException) -> str:
    """The sentence that says what is wrong in an onnxruntime error, without the paragraph of
    caveats before it."""
    text = ort_message(e)
    sentences = [s for s in re.split(r"(?<=\.) ", text.strip()) if s]
    return (sentences[-1] if sentences else text)[:300]


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def infer_shapes(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Strict shape inference, with data propagation; the inferred value infos and output types are
    written into `model`, which is returned. It runs on a copy without the data of the big weights
    (saving.split_weights; shapes need only their dims): no copy of the weights, no 2 GB limit."""
    light, _ = split_weights(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises InferenceError or bare RuntimeError depending on the op
        raise MergeError(f"{where}: shape inference failed ({first_line(e)})") from None
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    for output, typed in zip(model.graph.output, inferred.graph.output):
        output.CopyFrom(typed)
    return model


def reconcile_versions(
    models: dict[str, onnx.ModelProto], target_opset: int | None = None
) -> tuple[dict[str, onnx.ModelProto], int, int]:
    """Bring all models to one opset (the highest, or `target_opset`) and one IR version.

    Returns the converted models (keyed like the input, e.g. by file name), the opset and the IR
    version. A model whose operators the version converter cannot move between the two opsets is
    refused with the names of the operators whose definition changed in between.
    """
    if target_opset is not None:
        _check_target_opset(target_opset, max(m.ir_version for m in models.values()))
    opset = target_opset or max(opset_of(m) for m in models.values())
    out = {}
    for where, model in models.items():
        source = opset_of(model)
        if source != opset:
            try:
                model = version_converter.convert_version(model, opset)
                onnx.checker.check_model(model)
            except Exception as e:
                blocking = _changed_ops(model, source, opset)
                names = ", ".join(blocking) or "unknown operators"
                raise MergeError(
                    f"{where}: cannot convert from opset {source} to {opset}; blocking operators: "
                    f"{names} ({first_line(e)})"
                ) from None
            model = infer_shapes(model, where)
        out[where] = model
    ir_version = max(m.ir_version for m in out.values())
    for model in out.values():
        model.ir_version = ir_version
    return out, opset, ir_version


def reconcile_batch(models: dict[str, onnx.ModelProto]) -> list[str]:
    """Bring `models` (keyed by file, as reconcile_versions's) to one batch where some are fixed at a
    batch B (loading could not free their batch dim), and return the notes for the report. A free
    model runs at any batch, so its inputs are fixed at B too (in place): the merged model's inputs
    then all take batch B, which is where every later run reads it (runtime.fixed_batch_of), and
    tasks of equal input shape still share one input. Models fixed at two different batches cannot
    run as one model: a one-line MergeError naming both files."""
    fixed = {key: b for key, m in models.items() if (b := upgrade.fixed_batch(m)) is not None}
    if not fixed:
        return []
    (first, batch), *rest = fixed.items()
    other = next(((key, b) for key, b in rest if b != batch), None)
    if other:
        raise MergeError(f"{other[0]}: the batch dim is fixed at {other[1]}, and at {batch} in {first}: models "
                         "whose batch cannot be made symbolic must share their fixed batch to be merged")
    notes = []
    weights_of = {key: {t.name for t in m.graph.initializer} for key, m in models.items()}
    for key, model in models.items():
        if key in fixed:
            continue
        for value in model.graph.input:
            if value.name not in weights_of[key]:
                value.type.tensor_type.shape.dim[0].dim_value = batch  # clears its dim_param (a oneof)
        notes.append(f"{Path(key).name}: run at batch {batch}, the fixed batch of {Path(first).name}")
    return notes


def _check_target_opset(opset: int, ir_version: int) -> None:
    """Refuse an --opset that onnx cannot convert to or onnxruntime cannot run, before converting
    (a conversion to it would fail naming an input model, when the flag is what is wrong)."""
    newest = onnx.defs.onnx_opset_version()
    if not 1 <= opset <= newest:
        raise UsageError(f"--opset {opset}: give an opset from 1 to {newest} (the newest this onnx knows)")
    refusal = runtime_refusal(ir_version, opset)
    if refusal:
        raise UsageError(f"--opset {opset}: onnxruntime {_ort_version()} cannot run models of that opset ({refusal})")


def _changed_ops(model: onnx.ModelProto, source: int, target: int) -> list[str]:
    """'OpType (node)' for nodes whose operator definition differs between the two opsets."""
    lo, hi = sorted((source, target))
    out = []
    for node in model.graph.node:
        try:
            a = onnx.defs.get_schema(node.op_type, lo).since_version
            b = onnx.defs.get_schema(node.op_type, hi).since_version
        except onnx.defs.SchemaError:
            continue
        if a != b:
            out.append(f"{node.op_type} ({node.name})")
    return out


# ----------------------------------------------------------------------------------------------
# a merged model as an input that stands for its tasks: further tasks are added to it by the method that
# merged it (Method.extends_merged; mtz: onnxmerge.passes.mtz._zipped.ZippedNet.resume)

@dataclass
class MergedInput:
    """A merged model given as the first input of a further merge by its method: it stands for its
    tasks, and the models after it are added to its network."""

    path: Path
    model: onnx.ModelProto
    info: MergedInfo

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.info.tasks]

    def originals(self) -> dict[str, onnx.ModelProto]:
        """Each task's stand-in original, keyed like reconcile_versions's models: its sub-model of the
        merged model (contract.task_model), as the true originals are not at hand."""
        return {f"{self.path} (task {t.name})": task_model(self.model, t, str(self.path)) for t in self.info.tasks}


def find_merged_input(paths: list[Path], method: str) -> MergedInput | None:
    """The merged model among the inputs of a merge by `method`, loaded and checked, or None where they
    are all ordinary models. A one-line UsageError where a merged model cannot take further tasks:
    merged by another method, or by an onnxmerge that did not record the layout, or not the first
    input, or not the only merged model."""
    found = [(k, p, info) for k, p in enumerate(paths) if (info := _merged_metadata(p)) is not None]
    if not found:
        return None
    k, path, info = found[0]
    if len(found) > 1:
        raise UsageError(f"{found[1][1]}: a second merged model (besides {path}); {method} adds ordinary models to "
                         "one merged model")
    if info.method != method:
        raise UsageError(f"{path}: a model merged with --method {info.method or '(unknown)'}; {method} adds tasks only "
                         f"to a model merged with --method {method}")
    if not info.layout:
        raise UsageError(f"{path}: merged with --method {method} by onnxmerge {info.version or '(unknown version)'}, "
                         "which did not record the merged network's layout (onnxmerge.layout); merge the original "
                         "models again to add tasks")
    if k != 0:
        raise UsageError(f"{path}: give the merged model first: its tasks are zipped first, the models after it "
                         "are added to them")
    return MergedInput(path, load_model(path), info)


def _merged_metadata(path: Path) -> MergedInfo | None:
    """The onnxmerge metadata of the model at `path`, or None where it has none (or is no readable
    model: load_model then says what is wrong with it)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX, unreadable, a folder: load_model reports it
        return None
    if not any(p.key == "onnxmerge.tasks" for p in model.metadata_props):
        return None
    return read_metadata(model, str(path))
