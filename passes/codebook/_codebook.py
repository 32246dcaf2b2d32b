"""NeuralMerger's shared codebooks (Chou et al., IJCAI 2018, section 3): settings, the decomposition
of weights into 1x1xr pieces, k-means per segment and the reconstruction of the dense weights.

Notation of the paper: a Conv layer has p kernels of n x m x d (ONNX weight [p, d, n, m]).

- eq. 4: each kernel is n*m spatially 1x1 kernels (1 x 1 x d vectors along depth);
- eqs. 6-7: each 1x1xd vector is cut along depth into V = ceil(d / r) segments of length r
  (the last one zero-padded);
- eq. 8: for every segment index v, k-means over the r-vectors of *all* merged models in that
  segment gives C codewords shared by the models; every piece is replaced by its nearest codeword,
  so a layer is stored as a codebook [V, C, r] and one code index per (kernel, offset, segment).

Shared codebooks (ours, not the paper's): eq. 8's C codewords per segment cannot compress a narrow
layer (a 64-wide fc has 64 pieces per segment and model), so a setting may give one codebook to
every G consecutive segments (`Setting.group`; G >= V: one codebook for the whole layer): the
k-means of eq. 8 then runs over the pieces of all G segments together. The codes of such a layer
index the flattened codebook [V_g * C, r] directly (codeword c of codebook g is g * C + c), so the
portable form needs no segment offsets; the native kernels, which read codebook v for segment v,
keep the portable form for it (emit_native).

Segments only one model has (a model with a deeper input) get codewords of their own
(footnote 1): they are clustered over that model's pieces alone. A fully connected layer (3.2) is
cut into length-r segments along its input, each output neuron giving one r-vector per segment.
r is clamped to the layer's depth, so the first layer of a single-channel input uses r = 1, and C to
the number of pieces in a segment.

Layout used throughout (and by the `ai.onnxmerge` ops, onnxmerge.graph.ops):

    conv: codes [V, p, n, m]      weight[o, v*r + k, i, j] = codebook[v, codes[v, o, i, j], k]
    fc:   codes [V, out]          weight[o, v*r + k]       = codebook[v, codes[v, o], k]
    shared (G > 1): codebook [V_g, C, r], V_g = ceil(V / G), and codebook[v, c] above reads
          codebook.reshape(V_g * C, r)[codes], the codes holding (v // G) * C + c

Stored bytes (`stored_bytes`): float32 codebook V_g * C * r * 4, plus the codes of every member at
index_dtype(V_g * C)'s size, or half a byte each where they are packed (`packs`: at most 16 values,
two codes per byte, the portable form only): the initializers the portable form writes (its shape
constants are int64 scalars and short vectors, which onnxmerge.measure.metrics does not count as
parameters).
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
    """r: segment length along depth (or input features); codewords: C per codebook; group: G
    consecutive segments per codebook (1: a codebook per segment, eq. 8; G >= V: one codebook for
    the whole layer)."""

    r: int
    codewords: int
    group: int = 1

    def __str__(self) -> str:
        return f"{self.r}/{self.codewords}" + (f"/{self.group}" if self.group != 1 else "")


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
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*(?:/\s*(\d+)\s*)?", text)
    if not m:
        raise UsageError(f"{where}: {text!r} is not R/C or R/C/G (segment length / codewords / segments per "
                         f"codebook, e.g. 8/128 or 8/64/4)")
    s = Setting(int(m.group(1)), int(m.group(2)), int(m.group(3) or 1))
    if s.r < 1 or s.group < 1:
        raise UsageError(f"{where}: r and G must be at least 1")
    index_dtype(s.codewords)
    return s


def parse_layer_params(text: str) -> dict[str, Setting]:
    """'conv2=8/128,fc1=8/64/4' -> {"conv2": Setting(8, 128), "fc1": Setting(8, 64, 4)}.

    Layers are named convK / fcK (the K-th conv or fully connected layer of the first model,
    from 1, as `onnxmerge inspect` counts them) or by their node name in the first model."""
    out: dict[str, Setting] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--layer-params: {item!r} is not LAYER=R/C or LAYER=R/C/G")
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


def reconstruct(codebook: np.ndarray, codes: np.ndarray, kind: str, depth: int, shared: bool = False) -> np.ndarray:
    """The dense weight (conv [p, d, n, m], fc [out, in]) that codebook [V', C, r] and codes
    ([V, p, n, m] or [V, out]; V <= V') stand for: the numpy form of the codebook-gather subgraph.
    shared: the codes index the flattened codebook [V' * C, r] (a codebook shared by segments)."""
    v = codes.shape[0]
    r = codebook.shape[2]
    if shared:
        vec = codebook.reshape(-1, r)[codes.astype(np.int64)]  # [V, ..., r]
    else:
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
    itemsize: int = 4  # bytes per element of the dense weight as stored in the model

    @property
    def depth(self) -> int:
        return self.weight.shape[1]

    @property
    def dense_bytes(self) -> int:
        return self.weight.size * self.itemsize

    @property
    def per_segment(self) -> int:
        """Pieces per segment: p * n * m (conv) or out (fc)."""
        return self.weight.size // self.depth

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
    packed: bool = False  # the codes are stored two to a byte (set where they are emitted)

    @property
    def relative_error(self) -> float:
        """||W - W_hat||^2 / ||W||^2 over all members' pieces."""
        return self.error / self.energy if self.energy else 0.0

    def summary(self) -> dict:
        dense = sum(m.weight.size for m in self.members)
        stored = self.codebook.size + sum(c.size for c in self.codes)
        dense_bytes = sum(m.dense_bytes for m in self.members)
        stored_bytes = self.codebook.nbytes + sum((c.size + 1) // 2 if self.packed else c.nbytes for c in self.codes)
        return {
            "layer": self.label, "members": [m.layer for m in self.members],
            "r": self.setting.r, "codewords": self.setting.codewords, "segments": self.segments,
            "group": self.setting.group, "codebooks": int(self.codebook.shape[0]), "packed": self.packed,
            "pieces": int(sum(c.size for c in self.codes)), "kmeans_rel_error": round(self.relative_error, 6),
            "exact": self.exact, "kmeans_seconds": round(self.seconds, 3), "dense_params": int(dense),
            "codebook_params": int(self.codebook.size), "index_params": int(sum(c.size for c in self.codes)),
            "compression_params": round(dense / stored, 3) if stored else None,
            "dense_bytes": int(dense_bytes), "stored_bytes": int(stored_bytes),
            "compression_bytes": round(dense_bytes / stored_bytes, 3) if stored_bytes else None,
        }

    @property
    def segments(self) -> int:
        return max(int(c.shape[0]) for c in self.codes)


def effective(members: list[Member], setting: Setting, label: str = "") -> Setting:
    """The setting build_group applies to `members`: r clamped to the shallowest depth, G to the
    segments, C to the most pieces any one codebook has (a smaller codebook with the same codes)."""
    r = min(setting.r, min(m.depth for m in members))
    n_seg = [segments(m.depth, r) for m in members]
    group = min(setting.group, max(n_seg))
    n_books = segments(max(n_seg), group)
    most = max(sum(m.per_segment * _held(n, b, group) for m, n in zip(members, n_seg)) for b in range(n_books))
    codewords = min(setting.codewords, most)
    if group > 1 and n_books * codewords > 1 << 16:
        raise UsageError(f"codebook: layer {label}: {n_books} codebooks of {codewords} codewords need code indices "
                         f"beyond 65536; give more segments per codebook or fewer codewords")
    return Setting(r, codewords, group)


def _held(n_seg: int, book: int, group: int) -> int:
    """How many of a member's n_seg segments codebook `book` serves (G = group segments each)."""
    return max(0, min((book + 1) * group, n_seg) - book * group)


def code_dtype(setting: Setting, n_segments: int) -> np.dtype:
    """The codes' dtype under an effective setting: they index C codewords, or V_g * C when shared."""
    return index_dtype(setting.codewords * (segments(n_segments, setting.group) if setting.group > 1 else 1))


PACK_MAX = 16  # codes of at most this many values are stored two to a byte (when packing)


def packs(setting: Setting, n_segments: int, pack: bool) -> bool:
    """Whether the codes are stored as 4-bit pairs: packing on, and at most PACK_MAX values (C, or
    V_g * C for a shared codebook)."""
    n_books = segments(n_segments, setting.group) if setting.group > 1 else 1
    return pack and n_books * setting.codewords <= PACK_MAX


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """codes (values < 16, any shape) as uint8 [ceil(N / 2)]: code 2i in the low nibble of byte i,
    code 2i + 1 in the high one (onnxmerge.graph.ops.gather_weight unpacks them)."""
    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def stored_bytes(members: list[Member], setting: Setting, pack: bool = False) -> tuple[int, int]:
    """(codebook bytes, index bytes) that the portable form stores for `members` under the effective
    `setting`: the float32 codebook [V_g, C, r] once, the codes of every member (packed: `packs`)."""
    n_seg = [segments(m.depth, setting.r) for m in members]
    n_books = segments(max(n_seg), setting.group)
    counts = [n * m.per_segment for m, n in zip(members, n_seg)]
    if packs(setting, max(n_seg), pack):
        index = sum((n + 1) // 2 for n in counts)
    else:
        index = sum(counts) * code_dtype(setting, max(n_seg)).itemsize
    return n_books * setting.codewords * setting.r * 4, index


def build_group(label: str, members: list[Member], setting: Setting, *, n_init: int = 3, max_iter: int = 30,
                seed: int = 0) -> Group:
    """Cluster the members' pieces segment by segment into one shared codebook (eq. 8).

    Segment v is shared by the members whose depth reaches it; the k-means of each distinct set of
    members runs once over all their segments (batched), so members of unequal depth share the
    segments they have in common and the deeper ones get codewords of their own beyond (footnote 1).
    With setting.group = G > 1, codebook b is one k-means over the pieces of segments
    [b * G, (b + 1) * G) of every member that has them, and the codes index the flattened codebook.
    """
    t0 = time.perf_counter()
    setting = effective(members, setting, label)
    r, c, g = setting.r, setting.codewords, setting.group
    all_pieces = [pieces(m.weight, m.kind, r) for m in members]
    n_seg = [p.shape[0] for p in all_pieces]
    n_books = segments(max(n_seg), g)
    codebook = np.zeros((n_books, c, r), np.float32)
    labels = [np.zeros(p.shape[:2], np.int64) for p in all_pieces]
    group = Group(label, setting, members)
    limit = max_magnitude(r)
    # codebooks whose pieces come from the same members in the same numbers run as one batch
    batches: dict[tuple[int, ...], list[int]] = {}
    for b in range(n_books):
        batches.setdefault(tuple(_held(n, b, g) for n in n_seg), []).append(b)
    for held, books in batches.items():
        x = np.stack([np.concatenate([all_pieces[k][b * g:b * g + h].reshape(-1, r) for k, h in enumerate(held) if h])
                      for b in books])
        biggest = float(np.abs(x).max(initial=0.0))
        if biggest > limit:  # absurd weights (a corrupt file): k-means' float32 distances would overflow
            raise MergeError(f"codebook: layer {label}: weights up to {biggest:.3g} in magnitude; k-means "
                             f"needs them below {limit:.3g} (segments of r={r})")
        res = batched_kmeans(x, c, n_init=n_init, max_iter=max_iter, seed=seed + books[0] * g)
        codebook[books] = res.codebooks
        offset = np.asarray(books, np.int64)[:, None] * c if g > 1 else 0  # codes into the flattened codebook
        lab = res.labels + offset
        start = 0
        for k, h in enumerate(held):
            if not h:
                continue
            size = h * all_pieces[k].shape[1]
            for i, b in enumerate(books):
                labels[k][b * g:b * g + h] = lab[i, start:start + size].reshape(h, -1)
            start += size
        group.error += float(res.error.sum())
        group.energy += sum(float(np.square(x[i:i + 64], dtype=np.float64).sum()) for i in range(0, len(x), 64))
        group.exact &= bool(res.exact.all())
    group.codebook = codebook
    dtype = code_dtype(setting, max(n_seg))
    group.codes = [lab.reshape(m.code_shape(r)).astype(dtype) for lab, m in zip(labels, members)]
    group.seconds = time.perf_counter() - t0
    return group
