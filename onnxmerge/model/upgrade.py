"""Bringing graphs written the old way into the form onnxmerge merges, before loading checks them.

Model-zoo graphs from the exporters of 2017-2018 differ from what `torch.onnx.export` writes today in
four ways, none of which changes what they compute:

- IR version 3 lists every initializer as a graph input too (a default a caller could override).
  onnxmerge treats such inputs as the weights they are and drops them from the inputs.
- Opsets older than `MIN_OPSET` are converted up with onnx's version converter: the PyTorch bridge
  and the passes read the opset-13 forms (Squeeze / Unsqueeze / Split axes, Clip bounds and Pad pads
  as inputs).
- Weights computed by constant subgraphs (a Constant reshaped or transposed into a Conv weight) are
  folded into initializers later, by the pipeline's FoldConstantsPass; here they only need to load.
- The batch dim is fixed, usually at 1, and shape constants such as a Reshape's `[1, -1]` repeat it.
  `free_batch` makes the batch dim symbolic and rewrites those constants to copy the input's batch
  (Reshape's 0), then proves the rewrite: the freed graph on two stacked batches must equal the
  original graph run on each. Where that fails (a Flatten or Reshape that folds the batch into the
  features, a batch-sized constant that is not a Reshape target), the graph keeps its fixed batch B:
  the merge then runs at batch B (onnxmerge.model.runtime.fixed_batch_of), and the note says why.

Each step that applies adds a line to the notes that loading hands on to the report.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from onnxmerge.errors import MergeError
from onnxmerge.model.runtime import ort_error_text, random_feeds, session

# the oldest opset the bridge and the passes read (axes of Squeeze / Unsqueeze / Split as inputs)
MIN_OPSET = 13
BATCH = "batch"  # the name of the symbolic batch dim a freed graph gets
FREED_TOL = 1e-5  # relative: the freed graph computes the same operators on the same values


def drop_initializer_inputs(model: onnx.ModelProto) -> int:
    """Remove the graph inputs that name initializers (IR < 4); returns how many there were."""
    weights = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in weights]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return dropped


def upgrade_opset(model: onnx.ModelProto, source: int, where: str) -> onnx.ModelProto:
    """`model` converted from opset `source` to MIN_OPSET, its IR version raised to match."""
    try:
        model = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the converter raises RuntimeError / ConvertError with a C++ message
        text = re.sub(r"^\S+\.(?:cc|h|cpp):\d+: \w+: ", "", str(e).strip().splitlines()[0])  # its source location
        raise MergeError(f"{where}: cannot convert from opset {source} to {MIN_OPSET}, the oldest opset "
                         f"onnxmerge reads ({text[:200]})") from None
    # the IR version that the default domain's new opset needs (other domains keep their versions)
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for([helper.make_opsetid("", MIN_OPSET)]))
    return model


def written_the_old_way(model: onnx.ModelProto) -> bool:
    """Whether loading would change the graph: initializers listed as inputs, an opset below
    MIN_OPSET, or a fixed batch dim (freed where the graph allows it, else kept and noted)."""
    weights = {t.name for t in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    return (any(i.name in weights for i in model.graph.input) or opset < MIN_OPSET
            or fixed_batch(model) is not None)


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch dim shared by every graph input, or None where the batch is already symbolic
    (or the inputs disagree, or one has no shape: loading's input checks word those)."""
    sizes = set()
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if not dims or not dims[0].HasField("dim_value"):
            return None
        sizes.add(dims[0].dim_value)
    return sizes.pop() if len(sizes) == 1 else None


def free_batch(model: onnx.ModelProto, batch: int, where: str) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose inputs and outputs take a symbolic batch dim instead of `batch`, and
    the Reshape nodes whose constant target shape repeats it (their node names). Not yet checked:
    `freed_problem` proves the copy computes what `model` does, or says why not."""
    freed = onnx.ModelProto()
    freed.CopyFrom(model)
    graph = freed.graph
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = BATCH  # clears dim_value (a oneof)
    del graph.value_info[:]  # inferred at the fixed batch; loading infers them again
    batched = _batched_tensors(freed)
    constants = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    rewritten = []
    for k, node in enumerate(graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in constants:
            continue
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        shape = numpy_helper.to_array(constants[node.input[1]])
        if allowzero or shape.ndim != 1 or not len(shape) or shape[0] != batch or node.input[0] not in batched:
            continue
        new = shape.copy()
        new[0] = 0  # Reshape's 0: this dim as the input has it, i.e. the batch
        name = f"{node.input[1]}__batch_free"
        if name not in constants:
            tensor = numpy_helper.from_array(new.astype(shape.dtype), name)
            graph.initializer.append(tensor)
            constants[name] = tensor
        node.input[1] = name
        rewritten.append(node.name or f"#{k}")
    return freed, rewritten


def _batched_tensors(model: onnx.ModelProto) -> set[str]:
    """The tensors whose first dim is the symbolic batch, by shape inference on the freed graph."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference can fail at a Reshape that still repeats the fixed batch
        return set()
    out = set()
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        if dims and dims[0].dim_param == BATCH:
            out.add(value.name)
    return out


def freed_problem(original: onnx.ModelProto | str, freed: onnx.ModelProto, batch: int, where: str,
                  rewritten: list[str]) -> str | None:
    """Why `freed` is not proven to compute what `original` does, or None where it is: `freed` at
    batch 2 x `batch` must equal `original` run on each half. The original runs as given (by path,
    so that external data is found); a MergeError where the original itself does not run."""
    why = (f"Reshape node(s) {', '.join(rewritten[:3])} made to copy the batch dim" if rewritten
           else "no shape constant repeats it")
    problem = _mismatch(original, freed, batch, where, stack=2)
    return None if problem is None else f"{why}, and made symbolic {problem}"


def check_converted(original: onnx.ModelProto | str, converted: onnx.ModelProto, batch: int, where: str) -> None:
    """Refuse unless `converted`, the file's graph brought to the current form with its batch kept
    fixed (freed_problem failed), gives the file's outputs at that batch."""
    problem = _mismatch(original, converted, batch, where, stack=1)
    if problem:
        raise MergeError(f"{where}: the graph brought to the current form does not compute what the file does: {problem}")


def _mismatch(original: onnx.ModelProto | str, other: onnx.ModelProto, batch: int, where: str,
              stack: int) -> str | None:
    """What differs when `other` runs on `stack` seeded batches of `batch` stacked into one, against
    `original` run on each, or None. A MergeError where the original itself does not run."""
    try:
        fixed = session(original)
        parts = [random_feeds(fixed, batch, seed=s) for s in range(1, stack + 1)]
        expected = [fixed.run(None, h) for h in parts]
    except MergeError as e:  # an input onnxmerge cannot feed
        raise MergeError(f"{where}: {e}") from None
    except Exception as e:  # onnxruntime's own error types
        raise MergeError(f"{where}: onnxruntime cannot run this model ({ort_error_text(e)})") from None
    try:
        got = session(other).run(None, {k: np.concatenate([h[k] for h in parts]) for k in parts[0]})
    except Exception as e:  # onnxruntime's own error types
        return f"it does not run at batch {stack * batch}: {ort_error_text(e)}"
    for k, out in enumerate(fixed.get_outputs()):
        want = np.concatenate([e[k] for e in expected]) if np.ndim(expected[0][k]) else None
        if want is None or np.shape(got[k]) != want.shape:
            return f"its output {out.name!r} does not follow the batch"
        scale = max(float(np.max(np.abs(want))), 1e-12) if want.size and want.dtype.kind == "f" else 1.0
        diff = float(np.max(np.abs(got[k] - want))) / scale if want.size else 0.0
        if diff > FREED_TOL:
            return f"its output {out.name!r} changes (relative difference {diff:.2g})"
    return None
