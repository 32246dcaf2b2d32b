"""Writing models safely: refuse to overwrite an input, never leave a partial file.

Everything is written into a temporary name beside the target (starting with '.', ending '.tmp') and
renamed over the target only when complete (`os.replace` is atomic on one file system). An
exception, Ctrl-C or a SIGTERM turned into an exception by the command line removes the temporary;
a SIGKILL, which no program can catch, leaves at most that dot-temporary, never a partial output.

Models too big for one protobuf message (2 GB) are written with their weights in `<name>.data`
beside `<name>` (ONNX external data, a location relative to the model file): the data file and the
model are written into a temporary folder and renamed into place, the data file first. Smaller
models are one file, whatever their inputs were (the merged-model contract: one ONNX file).

Past WEIGHTS_APART_BYTES (64 MB) a model is never serialised whole in memory (`weights_apart`):
onnxruntime sessions get its weights as arrays, onnx.checker sees it without its weights' data
(`check_model`), and a one-file model is written one tensor at a time (`write_one_file`); shape
inference never sees weights' data (`split_weights`). The thresholds are module-level so that tests
can lower them and take these paths with small models.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmerge.errors import MergeError, UsageError

PROTOBUF_LIMIT = 2**31 - 1
# A model whose serialised size exceeds this is written with external data (and handled as too big
# to serialise whole elsewhere). Tests lower it to exercise the big-model paths with small models.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT
# With external data, initializers of at least this many bytes go to the data file (onnx's default).
EXTERNAL_TENSOR_BYTES = 1024
# Tensors in the data file start at page boundaries (onnxruntime can map aligned data in place).
_ALIGN = 4096
# Models of more than this many (serialised) bytes are never serialised whole in memory: onnxruntime
# gets their weights apart as numpy arrays, onnx.checker and shape inference see them without their
# weights, and a one-file model is written one tensor at a time (each avoids a transient copy).
WEIGHTS_APART_BYTES = 64 * 2**20
# The location that `split_weights` gives to weights kept in memory (never a file).
IN_MEMORY = "onnxmerge-in-memory"


def check_output_path(output: str | Path, inputs: list[str | Path]) -> Path:
    """Refuse an output path that is an input or whose folder does not exist, before any work."""
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give a file name for the merged model")
    if not out.parent.exists():
        raise UsageError(f"{out}: the output folder {out.parent} does not exist")
    for src in inputs:
        if out.exists() and Path(src).exists() and os.path.samefile(out, src):
            raise UsageError(f"{out}: the output path is one of the inputs; refusing to overwrite it")
        if out.resolve() == Path(src).resolve():
            raise UsageError(f"{out}: the output path is one of the inputs; refusing to overwrite it")
    return out


def approx_size(model: onnx.ModelProto) -> int:
    """The model's serialised size, a little over, without serialising its weights: upb's ByteSize
    serialises the whole message to measure it (a transient copy, and an error past 2 GB). The
    weights count by their type and dims, the rest by the size of each part."""
    graph = model.graph
    size = sum(tensor_nbytes(t) + 64 for t in graph.initializer)
    parts = (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.sparse_initializer,
             *model.metadata_props, *model.functions, *model.opset_import)
    return size + sum(part.ByteSize() for part in parts) + 4096


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data: its element count times the element size where numpy has the type,
    else (strings, bfloat16, 4-bit types) its serialised size."""
    dtype = NUMPY_TYPES.get(tensor.data_type)
    if dtype is None:
        return tensor.ByteSize()
    return math.prod(tensor.dims) * dtype.itemsize


# the ONNX element types numpy has natively (not bfloat16, float8 or 4-bit types)
NUMPY_TYPES = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)) for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}


def is_large(model: onnx.ModelProto) -> bool:
    """Whether `model` is written with external data and must not be serialised whole."""
    return approx_size(model) > EXTERNAL_DATA_THRESHOLD


def weights_apart(model: onnx.ModelProto) -> bool:
    """Whether `model` is big enough to be handled with its weights apart (WEIGHTS_APART_BYTES)."""
    return approx_size(model) > min(WEIGHTS_APART_BYTES, EXTERNAL_DATA_THRESHOLD)


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker on `model`; a big one is checked without its weights' data (the checker does
    not read tensor data, and its in-memory check serialises the model, which stops at 2 GB):
    the model without them, by path, beside an empty file standing in for the data."""
    if not weights_apart(model):
        onnx.checker.check_model(model)
        return
    light, _ = split_weights(model)
    with tempfile.TemporaryDirectory(prefix="onnxmerge-check-") as folder:
        (Path(folder) / IN_MEMORY).touch()
        onnx.save_model(light, str(Path(folder) / "model.onnx"))
        onnx.checker.check_model(str(Path(folder) / "model.onnx"))


def data_file_name(path: str | Path) -> str:
    """The external data file of a model written to `path`: `<name>.data` beside it."""
    return f"{Path(path).name}.data"


def split_weights(model: onnx.ModelProto, min_bytes: int = EXTERNAL_TENSOR_BYTES
                  ) -> tuple[onnx.ModelProto, list[tuple[onnx.TensorProto, onnx.TensorProto]]]:
    """A copy of `model` without the data of its initializers of at least `min_bytes`.

    Those initializers keep their name, type and dims and point at external data named
    `IN_MEMORY`; the second value pairs each of them with the original tensor, which is not copied.
    The copy is small enough to serialise, shape-infer or check whatever the model's size.
    """
    light = onnx.ModelProto()
    _copy_fields(model, light, skip=("graph",))
    _copy_fields(model.graph, light.graph, skip=("initializer",))
    moved = []
    for tensor in model.graph.initializer:
        if tensor_nbytes(tensor) < min_bytes:
            light.graph.initializer.add().CopyFrom(tensor)
            continue
        stub = light.graph.initializer.add()
        stub.CopyFrom(weightless(tensor.name, tensor.data_type, tensor.dims))
        moved.append((stub, tensor))
    return light, moved


def weightless(name: str, data_type: int, dims) -> onnx.TensorProto:
    """A tensor of that name, type and shape whose data is elsewhere (external data at IN_MEMORY)."""
    stub = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", IN_MEMORY
    return stub


def _copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every set field of protobuf message `src` into `dst` except those named in `skip`."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data as raw little-endian bytes (the external-data layout)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.to_array(tensor).tobytes()


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor as a numpy array; for raw data, a read-only view of one copy of the bytes."""
    if tensor.HasField("raw_data"):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 of the model's structure and weights, computed one tensor at a time (any size)."""
    light, moved = split_weights(model)
    h = hashlib.sha256(light.SerializeToString(deterministic=True))
    for _, tensor in moved:
        h.update(tensor_bytes(tensor))
    return h.hexdigest()


def save_atomic(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path` so that `path` is either the old file or the complete new one.

    A large model (`is_large`) goes to `path` + `<name>.data`, checked by onnx.checker on disk (its
    in-memory check stops at 2 GB) before it is renamed into place. `model` itself is not changed.
    """
    path = Path(path)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = work / path.name
        large = is_large(model)
        stale = None if large else _own_data_file(path)
        if large:
            data = data_file_name(path)
            write_with_external_data(model, staged, data)
            onnx.checker.check_model(str(staged))
            os.replace(work / data, path.parent / data)
        elif weights_apart(model):
            write_one_file(model, staged)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)
        if stale is not None:  # the earlier output's weights, which nothing refers to any more
            stale.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def write_with_external_data(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Write `model` to `path` and its initializers of at least EXTERNAL_TENSOR_BYTES to the file
    `location` beside it (a new file), one tensor at a time, without changing `model`."""
    light, moved = split_weights(model)
    with open(path.parent / location, "wb") as f:
        for stub, tensor in moved:
            offset = -f.tell() % _ALIGN + f.tell()
            f.write(b"\0" * (offset - f.tell()))
            f.write(tensor_bytes(tensor))
            del stub.external_data[:]
            for key, value in (("location", location), ("offset", offset), ("length", f.tell() - offset)):
                entry = stub.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(light, str(path))


def write_one_file(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` as one ONNX file without serialising it whole: the model without its
    initializers, then each initializer as its own field of the graph (protobuf lets a message's
    fields come in any order and a repeated field in pieces), so the transient copy is one tensor."""
    graph = onnx.GraphProto()
    _copy_fields(model.graph, graph, skip=("initializer",))
    rest = onnx.ModelProto()
    _copy_fields(model, rest, skip=("graph",))
    graph_bytes = graph.SerializeToString()
    sizes = [_serialized_tensor_size(t) for t in model.graph.initializer]
    graph_len = len(graph_bytes) + sum(1 + len(_varint(n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(rest.SerializeToString())
        f.write(_GRAPH_TAG + _varint(graph_len) + graph_bytes)
        for tensor, n in zip(model.graph.initializer, sizes):
            pieces = _tensor_pieces(tensor)
            if sum(map(len, pieces)) != n:  # raw data that does not fit the tensor's dims: never write it
                raise MergeError(f"tensor {tensor.name!r}: its data does not match its type and shape {list(tensor.dims)}")
            f.write(_INITIALIZER_TAG + _varint(n))
            for piece in pieces:
                f.write(piece)
            del pieces


def _tensor_pieces(tensor: onnx.TensorProto) -> list[bytes]:
    """`tensor.SerializeToString()` in pieces whose concatenation is those very bytes (fields in
    field-number order): the fields before raw_data, raw_data's key and length, its bytes, the
    fields after it. Serialising a tensor whole holds its data twice beside the tensor (the
    encoder's buffer and the bytes object made of it); reading raw_data alone, once."""
    if not tensor.HasField("raw_data"):
        return [tensor.SerializeToString()]
    numbers = {field.name: field.number for field, _ in tensor.ListFields()}
    before, after = onnx.TensorProto(), onnx.TensorProto()
    _copy_fields(tensor, before, skip=tuple(name for name, k in numbers.items() if k >= _RAW_DATA_FIELD))
    _copy_fields(tensor, after, skip=tuple(name for name, k in numbers.items() if k <= _RAW_DATA_FIELD))
    raw = tensor.raw_data
    return [before.SerializeToString(), _RAW_DATA_TAG + _varint(len(raw)), raw, after.SerializeToString()]


def _serialized_tensor_size(tensor: onnx.TensorProto) -> int:
    """A tensor's serialised size: its fields but raw data measured by upb, plus the raw data field
    from the tensor's type and dims (measuring it too would serialise a copy of the data)."""
    if not tensor.HasField("raw_data") or tensor.data_type not in NUMPY_TYPES:
        return tensor.ByteSize()
    rest = onnx.TensorProto()
    _copy_fields(tensor, rest, skip=("raw_data",))
    n = tensor_nbytes(tensor)
    return rest.ByteSize() + 1 + len(_varint(n)) + n


# protobuf keys (field number << 3 | wire type 2, length-delimited): ModelProto.graph = 7,
# GraphProto.initializer = 5
_GRAPH_TAG = bytes([7 << 3 | 2])
_INITIALIZER_TAG = bytes([5 << 3 | 2])
# TensorProto.raw_data = 9, length-delimited
_RAW_DATA_FIELD = onnx.TensorProto.RAW_DATA_FIELD_NUMBER
_RAW_DATA_TAG = bytes([_RAW_DATA_FIELD << 3 | 2])


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint encoding of a non-negative int."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def external_files(path: str | Path) -> list[Path]:
    """The external data files the ONNX model at `path` refers to (empty for a one-file model or a
    file that is not ONNX). Reads the model's structure only, not its weights."""
    path = Path(path)
    names = None
    try:
        if path.stat().st_size > WEIGHTS_APART_BYTES:  # a big one-file model: not parsed whole
            names = _external_locations(path)
    except (OSError, ValueError):
        names = None
    if names is None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # not ONNX, unreadable: it refers to nothing we know of
            return []
        names = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return sorted(path.parent / n for n in names)


def _external_locations(path: Path) -> set[str] | None:
    """The external data locations of the initializers of the ONNX file at `path`, read field by
    field from the file (the weights stored in it are skipped, never read: loading a big one-file
    model to learn that it has no external data would hold its weights twice). None where the file
    is not laid out as protobuf fields (the caller then parses it whole)."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size

        def varint() -> int:
            n, shift = 0, 0
            while True:
                b = f.read(1)
                if not b or shift > 63:
                    raise ValueError("bad varint")
                n |= (b[0] & 0x7F) << shift
                shift += 7
                if not b[0] & 0x80:
                    return n

        def fields(stop: int):
            """(field number, wire type, value or length) up to `stop`; a length-delimited value's
            bytes start at f.tell() and must be consumed (or skipped) by the caller."""
            while f.tell() < stop:
                key = varint()
                field, wire = key >> 3, key & 7
                if wire == 0:
                    yield field, wire, varint()
                elif wire == 1:
                    f.seek(8, 1)
                elif wire == 5:
                    f.seek(4, 1)
                elif wire == 2:
                    n = varint()
                    start = f.tell()
                    if start + n > stop:
                        raise ValueError("field past its message")
                    yield field, wire, n
                    f.seek(start + n)
                else:
                    raise ValueError("unsupported wire type")
            if f.tell() != stop:
                raise ValueError("message overruns")

        locations = set()
        for field, wire, n in fields(end):
            if field != 7 or wire != 2:  # ModelProto.graph
                continue
            for gfield, gwire, gn in fields(f.tell() + n):
                if gfield != 5 or gwire != 2:  # GraphProto.initializer
                    continue
                external, where = False, []
                for tfield, twire, tn in fields(f.tell() + gn):
                    if tfield == 14 and twire == 0:  # TensorProto.data_location
                        external = tn == onnx.TensorProto.EXTERNAL
                    elif tfield == 13 and twire == 2:  # TensorProto.external_data (key/value entry)
                        entry = onnx.StringStringEntryProto()
                        entry.ParseFromString(f.read(tn))
                        if entry.key == "location":
                            where.append(entry.value)
                if external:
                    locations.update(where)
        return locations


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of the model at `path`: the file plus the external data files it refers to."""
    path = Path(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path) if f.is_file())


def _own_data_file(path: Path) -> Path | None:
    """`<name>.data` beside `path` if the model now at `path` refers to it: the external data of an
    earlier output that a one-file model is replacing (removed after the rename, never before)."""
    data = path.parent / data_file_name(path)
    if not (path.is_file() and data.is_file()):
        return None
    return data if data in external_files(path) else None


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary path beside `path` (`.<name>.<pid>.tmp`, made with open()'s
    usual mode), then rename it over `path`; on any exception, Ctrl-C included, remove it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
