import onnxruntime as ort
import pytest

from onnxmerge import kernels
from onnxmerge.errors import MergeError


def test_loader_reports_state_honestly():
    if kernels.available():
        kernels.register(ort.SessionOptions())
        assert kernels.unavailable_reason() == ""
    else:
        assert "native kernels unavailable" in kernels.unavailable_reason()
        with pytest.raises(MergeError, match="not built"):
            kernels.register(ort.SessionOptions())
