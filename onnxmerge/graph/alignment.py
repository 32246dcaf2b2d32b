"""Layer alignment: which layer of model B corresponds to which layer of model A.

An `Alignment` is a strictly increasing mapping between same-kind layers (conv with conv, fully
connected with fully connected): pairs (i, j) with i and j both strictly increasing. It refuses to
exist otherwise. Three ways to get one:

- identity, when the two architectures are equal (same layer count and layer signatures);
- `align(a, b)`: dynamic programming that maximises the total compatibility of the pairs;
- given by the user: `parse_pairs("0=0,1=2,3=3")`.

Compatibility of layer a (at index i of n_a) and layer b (index j of n_b), in [0, 1], zero for
different kinds:

    score = 0.4 * depth + 0.3 * kernel + 0.3 * channels
    depth    = 1 - |i / (n_a - 1) - j / (n_b - 1)|         (relative depth; 1 when n = 1)
    kernel   = 1 if kernel shapes and depthwise-ness agree, else 0
    channels = sqrt( min(ci)/max(ci) * min(co)/max(co) )   (in and out channel ratios)

Pairs scoring below MIN_SCORE are never made; among the rest the DP (Needleman-Wunsch with no gap
penalty) picks the strictly increasing set of pairs with the highest total score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from onnxmerge.errors import UsageError
from onnxmerge.graph.layers import Layer, table

MIN_SCORE = 0.3
WEIGHTS = {"depth": 0.4, "kernel": 0.3, "channels": 0.3}


class AlignmentError(UsageError):
    pass


@dataclass(frozen=True)
class Alignment:
    a: str  # task names
    b: str
    pairs: tuple[tuple[int, int], ...]
    kinds_a: tuple[str, ...]
    kinds_b: tuple[str, ...]
    how: str = "dp"  # identity | dp | user

    def __post_init__(self):
        for (i0, j0), (i1, j1) in zip(self.pairs, self.pairs[1:]):
            if not (i1 > i0 and j1 > j0):
                raise AlignmentError(f"alignment {self.a}/{self.b} is not strictly increasing at {i0}={j0}, {i1}={j1}")
        for i, j in self.pairs:
            if not (0 <= i < len(self.kinds_a) and 0 <= j < len(self.kinds_b)):
                raise AlignmentError(
                    f"alignment pair {i}={j}: {self.a} has {len(self.kinds_a)} layers, {self.b} has {len(self.kinds_b)}")
            if self.kinds_a[i] != self.kinds_b[j]:
                raise AlignmentError(
                    f"alignment pair {i}={j} pairs a {self.kinds_a[i]} layer of {self.a} with a {self.kinds_b[j]} layer of {self.b}")

    @classmethod
    def of(cls, a: str, la: list[Layer], b: str, lb: list[Layer], pairs, how: str) -> Alignment:
        return cls(a, b, tuple(tuple(p) for p in pairs), tuple(l.kind for l in la), tuple(l.kind for l in lb), how)

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "how": self.how, "pairs": [list(p) for p in self.pairs]}


def compatibility(la: Layer, na: int, lb: Layer, nb: int) -> float:
    """The documented score above, in [0, 1]; 0 for layers of different kinds."""
    if la.kind != lb.kind:
        return 0.0
    pa = la.index / (na - 1) if na > 1 else 1.0
    pb = lb.index / (nb - 1) if nb > 1 else 1.0
    depth = 1.0 - abs(pa - pb)
    kernel = float(la.kernel == lb.kernel and la.depthwise == lb.depthwise)
    channels = math.sqrt(_ratio(la.in_channels, lb.in_channels) * _ratio(la.out_channels, lb.out_channels))
    return WEIGHTS["depth"] * depth + WEIGHTS["kernel"] * kernel + WEIGHTS["channels"] * channels


def align(a: str, la: list[Layer], b: str, lb: list[Layer]) -> Alignment:
    """Identity for equal architectures, else the highest-scoring strictly increasing mapping."""
    if len(la) == len(lb) and all(x.signature == y.signature for x, y in zip(la, lb)):
        return Alignment.of(a, la, b, lb, [(i, i) for i in range(len(la))], "identity")
    na, nb = len(la), len(lb)
    score = [[compatibility(x, na, y, nb) for y in lb] for x in la]
    best = [[0.0] * (nb + 1) for _ in range(na + 1)]
    for i in range(1, na + 1):
        for j in range(1, nb + 1):
            s = score[i - 1][j - 1]
            take = best[i - 1][j - 1] + s if s >= MIN_SCORE else -1.0
            best[i][j] = max(best[i - 1][j], best[i][j - 1], take)
    pairs, i, j = [], na, nb
    while i > 0 and j > 0:
        s = score[i - 1][j - 1]
        if s >= MIN_SCORE and math.isclose(best[i][j], best[i - 1][j - 1] + s):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif best[i][j] == best[i - 1][j]:
            i -= 1
        else:
            j -= 1
    return Alignment.of(a, la, b, lb, pairs[::-1], "dp")


def parse_pairs(spec: str) -> list[tuple[int, int]]:
    """'0=0,1=2,3=3' -> [(0, 0), (1, 2), (3, 3)]."""
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            i, j = item.split("=")
            pairs.append((int(i), int(j)))
        except ValueError:
            raise AlignmentError(f"--align: {item!r} is not a layer pair like 0=0 (layer index of the first model = layer index of the second)") from None
    return pairs


def format_alignment(al: Alignment, la: list[Layer], lb: list[Layer]) -> str:
    """The alignment as a table: the paired layers of both models and each pair's score."""
    rows = [(f"{al.a} #", "layer", "", f"{al.b} #", "layer", "score")]
    for i, j in al.pairs:
        rows.append((str(i), _describe(la[i]), "<->", str(j), _describe(lb[j]),
                     f"{compatibility(la[i], len(la), lb[j], len(lb)):.2f}"))
    unpaired_a = sorted(set(range(len(la))) - {i for i, _ in al.pairs})
    unpaired_b = sorted(set(range(len(lb))) - {j for _, j in al.pairs})
    text = f"alignment ({al.how}): {len(al.pairs)} pairs\n" + table(rows)
    if unpaired_a or unpaired_b:
        text += f"\nunpaired: {al.a} {unpaired_a or '-'}, {al.b} {unpaired_b or '-'}"
    return text


def _describe(l: Layer) -> str:
    kind = "dwconv" if l.depthwise else l.kind
    k = "x".join(map(str, l.kernel))
    return f"{kind} {k + ' ' if k else ''}{l.in_channels}->{l.out_channels}"


def _ratio(x: int, y: int) -> float:
    return min(x, y) / max(x, y) if max(x, y) else 1.0
