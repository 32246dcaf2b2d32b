"""Errors that reach the user as one line (see DESIGN.md, "What bad input gets").

`UsageError` (exit status 2) is for what the user asked wrongly: a bad path, a flag that does not fit,
an output that would overwrite an input. `MergeError` (exit status 1) is for inputs that cannot be
processed: a file that is not ONNX, an unsupported operator, data that does not fit a model.
Every message names the file, node or layer it is about.
"""


class OnnxMergeError(Exception):
    """Base class: an error the CLI prints as one line, without a traceback."""

    exit_code = 1


class UsageError(OnnxMergeError):
    exit_code = 2


class MergeError(OnnxMergeError):
    exit_code = 1


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most `limit` characters), for one-line errors."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
