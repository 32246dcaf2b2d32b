"""Writing models safely: refuse to overwrite an input, never leave a partial file.

The model goes to a temporary file beside the target and is renamed over it only when complete
(`os.replace` is atomic on one file system). Models over 2 GB are written with external data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnxmerge.errors import UsageError

PROTOBUF_LIMIT = 2**31 - 1


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


def save_atomic(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a model file is as readable as any
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            data = path.name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open() keeps the umask's mode
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
