"""Loading and checking input models, and reconciling their IR and opset versions.

Every input goes through `load_model`: it must exist, parse as ONNX (external data is loaded from
beside the file), pass `onnx.checker`, use only the supported operators and survive shape inference.
Each failure is one `MergeError` that names the file and, for operators, every offending node.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import version_converter
from google.protobuf.message import DecodeError

from onnxmerge.errors import MergeError, UsageError

# The operator set onnxmerge understands (ai.onnx domain). Constant is folded away on load.
SUPPORTED_OPS = frozenset(
    """Conv Gemm MatMul BatchNormalization Relu Clip LeakyRelu Sigmoid Tanh MaxPool AveragePool
    GlobalAveragePool Flatten Reshape Add Concat Softmax Pad Dropout Identity Constant""".split()
)
DEFAULT_DOMAINS = ("", "ai.onnx")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return imp.version
    return 1


def unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """'OpType (node name)' for each node outside the supported operator set."""
    bad = []
    for i, node in enumerate(model.graph.node):
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in SUPPORTED_OPS:
            op = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
            bad.append(f"{op} ({node.name or f'node #{i}'})")
    return bad


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load, check and shape-infer one input model; a one-line MergeError if it is unusable."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise MergeError(f"{path}: not an ONNX model (the file does not parse: {_first_line(e)})") from None
    except OSError as e:  # e.g. missing external data file
        raise MergeError(f"{path}: cannot read the model or its external data ({_first_line(e)})") from None
    if not model.graph.node and not model.graph.output:
        raise MergeError(f"{path}: not an ONNX model (empty or truncated file)")
    try:
        # by path, so that models over 2 GB with external data are checked too
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise MergeError(f"{path}: invalid ONNX model ({_first_line(e)})") from None
    bad = unsupported_nodes(model)
    if bad:
        raise MergeError(f"{path}: unsupported operator(s): {', '.join(bad)}")
    return infer_shapes(model, str(path))


def infer_shapes(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:  # onnx raises InferenceError or bare RuntimeError depending on the op
        raise MergeError(f"{where}: shape inference failed ({_first_line(e)})") from None


def reconcile_versions(
    models: dict[str, onnx.ModelProto], target_opset: int | None = None
) -> tuple[dict[str, onnx.ModelProto], int, int]:
    """Bring all models to one opset (the highest, or `target_opset`) and one IR version.

    Returns the converted models (keyed like the input, e.g. by file name), the opset and the IR
    version. A model whose operators the version converter cannot move between the two opsets is
    refused with the names of the operators whose definition changed in between.
    """
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
                    f"{names} ({_first_line(e)})"
                ) from None
            model = infer_shapes(model, where)
        out[where] = model
    ir_version = max(m.ir_version for m in out.values())
    for model in out.values():
        model.ir_version = ir_version
    return out, opset, ir_version


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
