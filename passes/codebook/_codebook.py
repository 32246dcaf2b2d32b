"""NeuralMerger's shared codebooks (Chou et al., IJCAI 2018, section 3): settings, the decomposition
of weights into 1x1xr pieces, k-means per segment and the reconstruction of the dense weights.

Notation of the paper: a Conv layer has p kernels of n x m x d (ONNX weight [p, d, n, m]).

- eq. 4: each kernel is n*m spatially 1x1 kernels (1 x 1 x d vectors along depth);
- eqs. 6-7: each 1x1xd vector is cut along depth into V = ceil(d / r) segments of length r
  (the last one zero-padded);
- eq. 8: for every segment index v, k-means over the r-vectors of *all* merged models in that
  segment gives C codewords shared by the models; every piece is replaced by its nearest codeword,
  so a layer is stored as a codebook [V, C, r] and one code index per (kernel, offset, segment).

Segments only one model has (a model with a deeper input) get codewords of their own
(footnote 1): they are clustered over that model's pieces alone. A fully connected layer (3.2) is
cut into length-r segments along its input, each output neuron giving one r-vector per segment.
r is clamped to the layer's depth, so the first layer of a single-channel input uses r = 1, and C to
the number of pieces in a segment.

Layout used throughout (and by the `ai.onnxmerge` ops, onnxmerge.graph.ops):

    conv: codes [V, p, n, m]      weight[o, v*r + k, i, j] = codebook[v, codes[v, o, i, j], k]
    fc:   codes [V, out]          weight[o, v*r + k]       = codebook[v, codes[v, o], k]
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from onnxmerge.errors import MergeError, UsageError
from onnxmerge.passes.codebook._kmeans import batched_kmeans, max_magnitude


@dataclass(frozen=True)
class Setting:
    """r: segment length along depth (or input features); codewords: C per segment."""

    r: int
    codewords: int

    def __str__(self) -> str:
        return f"{self.r}/{self.codewords}"


# The presets give a setting per layer kind. NeuralMerger's Table 1 (LeNet pair) and Table 4
# (VGG / ZF pair) name an accurate (ACCU) and a light (LIGHT) setting; these are ours, chosen on the
# real LeNet pair of BENCHMARKS.md ("codebook") to reach the paper's compression (10.4x, 15.3x).
PRESETS: dict[str, dict[str, Setting]] = {
    "accu": {"conv": Setting(4, 128), "fc": Setting(4, 64)},
    "light": {"conv": Setting(8, 64), "fc": Setting(8, 64)},
}


def index_dtype(codewords: int) -> np.dtype:
    """uint8 code indices when C <= 256, else uint16 (C <= 65536)."""
    if not 1 <= codewords <= 1 << 16:
        raise UsageError(f"--codewords {codewords}: give 1 to 65536 codewords")
    return np.dtype(np.uint8 if codewords <= 256 else np.uint16)


def parse_setting(text: str, where: str) -> Setting:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"{where}: {text!r} is not R/C (segment length / codewords, e.g. 8/128)")
    s = Setting(int(m.group(1)), int(m.group(2)))
    if s.r < 1:
        raise UsageError(f"{where}: r must be at least 1")
    index_dtype(s.codewords)
    return s


def parse_layer_params(text: str) -> dict[str, Setting]:
    """'conv2=8/128,fc1=8/64' -> {"conv2": Setting(8, 128), "fc1": Setting(8, 64)}.

    Layers are named convK / fcK (the K-th conv or fully connected layer of the first model,
    from 1, as `onnxmerge inspect` counts them) or by their node name in the first model."""
    out: dict[str, Setting] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--layer-params: {item!r} is not LAYER=R/C")
        out[name.strip()] = parse_setting(value, f"--layer-params {name.strip()}")
    return out


# ----------------------------------------------------------------------------------------------
# pieces and reconstruction (eqs. 4, 6, 7)


def segments(depth: int, r: int) -> int:
    return math.ceil(depth / r)


def logical_fc(weight: np.ndarray, out_axis: int) -> np.ndarray:
    """A fully connected weight as [out, in], whatever its stored orientation."""
    return weight if out_axis == 0 else weight.T


def pieces(weight: np.ndarray, kind: str, r: int) -> np.ndarray:
    """The r-vectors of a weight, [V, K, r]: K = p*n*m pieces per segment for a conv weight
    [p, d, n, m] (order o, i, j), K = out for a fully connected weight given as [out, in]."""
    if kind == "conv":
        p, d, n, m = weight.shape
        v = segments(d, r)
        w = np.zeros((p, v * r, n, m), np.float32)
        w[:, :d] = weight
        return np.ascontiguousarray(w.reshape(p, v, r, n, m).transpose(1, 0, 3, 4, 2).reshape(v, p * n * m, r))
    out, d = weight.shape
    v = segments(d, r)
    w = np.zeros((out, v * r), np.float32)
    w[:, :d] = weight
    return np.ascontiguousarray(w.reshape(out, v, r).transpose(1, 0, 2))


def reconstruct(codebook: np.ndarray, codes: np.ndarray, kind: str, depth: int) -> np.ndarray:
    """The dense weight (conv [p, d, n, m], fc [out, in]) that codebook [V', C, r] and codes
    ([V, p, n, m] or [V, out]; V <= V') stand for: the numpy form of the codebook-gather subgraph."""
    v = codes.shape[0]
    r = codebook.shape[2]
    seg = np.arange(v).reshape((v,) + (1,) * (codes.ndim - 1))
    vec = codebook[seg, codes.astype(np.int64)]  # [V, ..., r]
    if kind == "conv":
        w = vec.transpose(1, 0, 4, 2, 3)  # [p, V, r, n, m]
        p, _, _, n, m = w.shape
        return np.ascontiguousarray(w.reshape(p, v * r, n, m)[:, :depth])
    return np.ascontiguousarray(vec.transpose(1, 0, 2).reshape(-1, v * r)[:, :depth])


# ----------------------------------------------------------------------------------------------
# one codebook for a group of aligned layers (eq. 8)


@dataclass
class Member:
    """One model's layer in a codebook group: its weight in the layout of `pieces`."""

    task: str
    layer: str  # node name in the merged graph
    kind: str
    weight: np.ndarray  # conv [p, d, n, m] or fc [out, in]

    @property
    def depth(self) -> int:
        return self.weight.shape[1]

    def code_shape(self, r: int) -> tuple[int, ...]:
        v = segments(self.depth, r)
        return (v, self.weight.shape[0], *self.weight.shape[2:]) if self.kind == "conv" else (v, self.weight.shape[0])


@dataclass
class Group:
    """The result for one group: the shared codebook and each member's codes, with figures."""

    label: str
    setting: Setting
    members: list[Member]
    codebook: np.ndarray = field(default=None)  # [V_max, C, r]
    codes: list[np.ndarray] = field(default_factory=list)  # per member, index_dtype(C)
    error: float = 0.0  # sum of squared errors over all pieces
    energy: float = 0.0  # sum of squares of all pieces
    exact: bool = True  # every segment had at most C distinct pieces
    seconds: float = 0.0

    @property
    def relative_error(self) -> float:
        """||W - W_hat||^2 / ||W||^2 over all members' pieces."""
        return self.error / self.energy if self.energy else 0.0

    def summary(self) -> dict:
        dense = sum(m.weight.size for m in self.members)
        stored = self.codebook.size + sum(c.size for c in self.codes)
        return {
            "layer": self.label, "members": [m.layer for m in self.members],
            "r": self.setting.r, "codewords": self.setting.codewords, "segments": int(self.codebook.shape[0]),
            "pieces": int(sum(c.size for c in self.codes)), "kmeans_rel_error": round(self.relative_error, 6),
            "exact": self.exact, "kmeans_seconds": round(self.seconds, 3), "dense_params": int(dense),
            "codebook_params": int(self.codebook.size), "index_params": int(sum(c.size for c in self.codes)),
            "compression_params": round(dense / stored, 3) if stored else None,
        }


def build_group(label: str, members: list[Member], setting: Setting, *, n_init: int = 3, max_iter: int = 30,
                seed: int = 0) -> Group:
    """Cluster the members' pieces segment by segment into one shared codebook (eq. 8).

    Segment v is shared by the members whose depth reaches it; the k-means of each distinct set of
    members runs once over all their segments (batched), so members of unequal depth share the
    segments they have in common and the deeper ones get codewords of their own beyond (footnote 1).
    """
    t0 = time.perf_counter()
    r = min(setting.r, min(m.depth for m in members))
    all_pieces = [pieces(m.weight, m.kind, r) for m in members]
    n_seg = [p.shape[0] for p in all_pieces]
    # no segment needs more codewords than it has pieces (a smaller codebook with the same codes)
    most = max(sum(p.shape[1] for p, n in zip(all_pieces, n_seg) if n > v) for v in range(max(n_seg)))
    setting = Setting(r, min(setting.codewords, most))
    dtype = index_dtype(setting.codewords)
    v_max = max(n_seg)
    codebook = np.zeros((v_max, setting.codewords, r), np.float32)
    labels = [np.zeros(p.shape[:2], np.int64) for p in all_pieces]
    group = Group(label, setting, members)
    bounds = sorted({0, *n_seg})
    for lo, hi in zip(bounds, bounds[1:]):  # segments [lo, hi) are held by the same members
        who = [k for k, n in enumerate(n_seg) if n >= hi]
        x = np.concatenate([all_pieces[k][lo:hi] for k in who], axis=1)
        biggest, limit = float(np.abs(x).max(initial=0.0)), max_magnitude(r)
        if biggest > limit:  # absurd weights (a corrupt file): k-means' float32 distances would overflow
            raise MergeError(f"codebook: layer {label}: weights up to {biggest:.3g} in magnitude; k-means "
                             f"needs them below {limit:.3g} (segments of r={r})")
        res = batched_kmeans(x, setting.codewords, n_init=n_init, max_iter=max_iter, seed=seed + lo)
        codebook[lo:hi] = res.codebooks
        start = 0
        for k in who:
            size = all_pieces[k].shape[1]
            labels[k][lo:hi] = res.labels[:, start:start + size]
            start += size
        group.error += float(res.error.sum())
        group.energy += sum(float(np.square(x[i:i + 64], dtype=np.float64).sum()) for i in range(0, len(x), 64))
        group.exact &= bool(res.exact.all())
    group.codebook = codebook
    group.codes = [lab.reshape(m.code_shape(r)).astype(dtype) for lab, m in zip(labels, members)]
    group.seconds = time.perf_counter() - t0
    return group
