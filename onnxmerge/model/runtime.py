"""Running a model in onnxruntime: the one session factory onnxmerge uses, and seeded feeds.

Checks, evaluation, calibration's teachers and timing all open their sessions here, so that thread
counts, graph optimisations and big-model handling (weights computed on in place) are the same
everywhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxmerge.errors import MergeError, first_line
from onnxmerge.kernels import register
from onnxmerge.model.saving import IN_MEMORY, split_weights, tensor_array, weights_apart


def session(model: onnx.ModelProto | str | os.PathLike, *, threads: int | None = 1,
            optimize: bool = False, native: bool = False,
            weights: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session.

    threads=1: one intra-op and one inter-op thread, sequential execution; another int: that many
    intra-op threads; None: onnxruntime's defaults. Graph optimisations are off unless `optimize`, so
    that a check sees the graph itself (onnxsim's habit); timing and evaluation turn them on.
    `native`: register onnxmerge's ai.onnxmerge kernels (onnxmerge.kernels).
    """
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # a check runs a few batches once: without the arena its memory is returned when it ends
        # (a codebook model's dense weights would otherwise stay in the pool)
        so.enable_cpu_mem_arena = False
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # fatal only: a failing run raises an exception that onnxmerge words as its one-line error; the
    # error onnxruntime also logs would be a second line on stderr
    so.log_severity_level = 4
    if native:

        register(so)
    if isinstance(model, onnx.ModelProto) and weights is None and weights_apart(model):
        # a big model: no serialised copy of its weights (nor a 2 GB limit); one copy as arrays
        model, moved = split_weights(model)
        weights = {stub.name: tensor_array(tensor) for stub, tensor in moved}
    if not weights:
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(Path(model))
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return _session_on_arrays(model, so, weights, prepack=optimize)


def _session_on_arrays(light: onnx.ModelProto, so: ort.SessionOptions, weights: dict[str, np.ndarray],
                       prepack: bool) -> ort.InferenceSession:
    """A session of `light` (its big weights: stubs at saving.IN_MEMORY) that computes on the arrays
    `weights` themselves. `add_initializer` is onnxruntime's one way to use a caller's buffer in
    place (`add_external_initializers` copies every weight, and pre-packing copies a Gemm's or
    MatMul's weights again, transiently 3x the weights); it overrides initializers of the model,
    so the stubs stay, and they are checked against a file at their location: the light model is
    loaded by path, from a temporary folder holding it and an empty stand-in for that file, which
    onnxruntime never reads. A check session (`prepack` False) also leaves pre-packing off (its
    packed copy would sit beside the arrays); a timing one keeps it, as a deployment runs."""
    import tempfile


    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in weights.items()}
    for name, value in values.items():
        so.add_initializer(name, value)
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="onnxmerge-session-") as folder:
        (Path(folder) / IN_MEMORY).touch()
        onnx.save_model(light, str(Path(folder) / "model.onnx"))
        sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    sess.onnxmerge_weights = values  # onnxruntime reads them in place: they live as long as the session
    return sess


def input_signature(value: onnx.ValueInfoProto) -> tuple[int, tuple]:
    """(element type, shape) of a graph input; symbolic or unknown dims are None."""
    t = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return t.elem_type, dims


_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def input_shape(arg, batch: int) -> tuple[int, ...]:
    """The concrete shape of session input `arg` at `batch`: a symbolic first dim becomes `batch`;
    any other symbolic dim, or a fixed first dim other than `batch`, is an error."""
    shape = list(arg.shape)
    if not shape:
        return ()
    if not isinstance(shape[0], int):
        shape[0] = batch
    elif shape[0] != batch:
        raise MergeError(f"input {arg.name!r} has a fixed batch dim {shape[0]}, cannot run it at "
                         f"batch {batch}")
    if any(not isinstance(d, int) for d in shape[1:]):
        raise MergeError(f"input {arg.name!r} has symbolic dims besides the batch: {arg.shape}")
    return tuple(shape)


def input_dtype(arg) -> type:
    """The numpy type to feed session input `arg` with; a MergeError for a type onnxmerge cannot feed."""
    if arg.type not in _NP_TYPES:
        raise MergeError(f"input {arg.name!r} has type {arg.type}, which onnxmerge cannot feed")
    return _NP_TYPES[arg.type]


def fixed_batch_of(source: ort.InferenceSession | onnx.ModelProto) -> int | None:
    """The batch size a model can only run at: the fixed first dim of its inputs (a graph whose batch
    dim loading could not make symbolic, onnxmerge.model.upgrade, and a model merged from one keep
    it), or None where the batch is free. `source`: a session or a ModelProto. It is the one place
    that every run at a batch of onnxmerge's choosing (checks, evaluation, latency, calibration)
    asks, so that a merge at a fixed batch runs there and nowhere else."""
    if isinstance(source, onnx.ModelProto):
        weights = {t.name for t in source.graph.initializer}
        firsts = [next(iter(i.type.tensor_type.shape.dim), None) for i in source.graph.input if i.name not in weights]
        fixed = {d.dim_value for d in firsts if d is not None and d.HasField("dim_value")}
    else:
        fixed = {a.shape[0] for a in source.get_inputs() if a.shape and isinstance(a.shape[0], int)}
    if len(fixed) > 1:
        raise MergeError(f"the model's inputs have different fixed batch dims ({', '.join(map(str, sorted(fixed)))}); "
                         "onnxmerge runs a model at one batch size")
    return fixed.pop() if fixed else None


def run_batch(source: ort.InferenceSession | onnx.ModelProto, wanted: int) -> int:
    """`wanted`, or the model's fixed batch where it has one (`fixed_batch_of`)."""
    return fixed_batch_of(source) or wanted


def random_feeds(sess: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for every input of `sess` at `batch`: standard-normal floats, zeros otherwise."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        shape, dtype = input_shape(arg, batch), input_dtype(arg)
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype)
    return feeds


def ort_error_text(e: BaseException) -> str:
    """An onnxruntime load or run error as 'node NAME (Op): what is wrong' (the whole message: its
    details say which shapes disagree)."""
    return ort_message(e)[:300]


def ort_message(e: BaseException) -> str:
    """An onnxruntime error's text without the status prefix and the C++ source location."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from .*? failed: ?)?", "",
                  first_line(e, limit=2000))
    text = re.sub(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ",
                  r"node \2 (\1): ", text)
    # a source location, with the C++ function's signature where onnxruntime prints one
    text = re.sub(r"\S+\.(?:cc|h|cpp):\d+ (?:[\w:<>]+ )*[\w:<>~]+(?:\(\))?\([^()]*\)(?: const)?"
                  r"(?: \[with [^\]]*\])? ", "", text)
    return re.sub(r"\S+\.(?:cc|h|cpp):\d+ \S+ ", "", text)
