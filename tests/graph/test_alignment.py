"""Alignment: the mapping object's invariants, identity, and the DP on different architectures."""

import pytest

from onnxmerge.graph.alignment import Alignment, AlignmentError, align, compatibility, parse_pairs
from onnxmerge.graph.layers import Layer


def conv(i, cin, cout, k=3, groups=1):
    return Layer(i, "conv", "Conv", f"c{i}", f"w{i}", None, f"y{i}", cin, cout, (k, k), groups, (1, 1))


def fc(i, cin, cout):
    return Layer(i, "fc", "Gemm", f"f{i}", f"w{i}", None, f"y{i}", cin, cout)


LENET = [conv(0, 1, 6, 5), conv(1, 6, 16, 5), fc(2, 256, 120), fc(3, 120, 84), fc(4, 84, 10)]
VGG = [conv(0, 1, 16), conv(1, 16, 16), conv(2, 16, 32), conv(3, 32, 32), fc(4, 1568, 64), fc(5, 64, 10)]


def test_mapping_refuses_non_increasing_and_mixed_kinds():
    kinds = ("conv", "conv", "fc")
    with pytest.raises(AlignmentError, match="strictly increasing"):
        Alignment("a", "b", ((0, 1), (1, 1)), kinds, kinds)
    with pytest.raises(AlignmentError, match="strictly increasing"):
        Alignment("a", "b", ((1, 0), (0, 1)), kinds, kinds)
    with pytest.raises(AlignmentError, match="pairs a conv layer of a with a fc layer of b"):
        Alignment("a", "b", ((0, 2),), kinds, kinds)
    with pytest.raises(AlignmentError, match="has 3 layers"):
        Alignment("a", "b", ((0, 0), (5, 2)), kinds, kinds)
    Alignment("a", "b", ((0, 0), (2, 2)), kinds, kinds)  # a valid one exists


def test_identity_for_equal_architectures():
    al = align("a", LENET, "b", LENET)
    assert al.how == "identity" and al.pairs == tuple((i, i) for i in range(5))


def test_dp_alignment_of_lenet_and_vgg_is_strictly_increasing_and_type_correct():
    al = align("lenet", LENET, "vgg", VGG)
    assert al.how == "dp"
    assert all(LENET[i].kind == VGG[j].kind for i, j in al.pairs)
    assert all(i1 > i0 and j1 > j0 for (i0, j0), (i1, j1) in zip(al.pairs, al.pairs[1:]))
    # the classifier layers (last of each) pair, both convs of LeNet find a conv partner
    assert (4, 5) in al.pairs
    assert sum(1 for i, _ in al.pairs if LENET[i].kind == "conv") == 2


def test_dp_maximises_total_score():
    """Brute force over all strictly increasing matchings of a small case agrees with the DP."""
    from itertools import combinations

    a, b = LENET, VGG
    na, nb = len(a), len(b)

    def total(pairs):
        s = [compatibility(a[i], na, b[j], nb) for i, j in pairs]
        return sum(s) if all(x >= 0.3 for x in s) else -1

    best = 0.0
    for k in range(1, min(na, nb) + 1):
        for ia in combinations(range(na), k):
            for jb in combinations(range(nb), k):
                best = max(best, total(list(zip(ia, jb))))
    assert total(align("a", a, "b", b).pairs) == pytest.approx(best)


def test_parse_pairs():
    assert parse_pairs("0=0, 1=2,3=3") == [(0, 0), (1, 2), (3, 3)]
    with pytest.raises(AlignmentError, match="'1-2' is not a layer pair"):
        parse_pairs("0=0,1-2")


def test_compatibility_documented_terms():
    assert compatibility(conv(0, 1, 6), 1, fc(0, 1, 6), 1) == 0.0
    assert compatibility(LENET[0], 5, LENET[0], 5) == pytest.approx(1.0)
    # same position and kernel, channel ratios 1/2 and 1 -> 0.4 + 0.3 + 0.3 * sqrt(0.5)
    assert compatibility(conv(0, 2, 8), 2, conv(0, 1, 8), 2) == pytest.approx(0.7 + 0.3 * 0.5 ** 0.5)
