#!/usr/bin/env python3
"""Train and export the project's real models (small CNNs on MNIST, Fashion-MNIST and FSDD).

    python tools/train_models.py [--group {examples,tests,bench,mtz,zoo,budget} ...] [--only NAME ...]
                                 [--out-examples DIR] [--out-tests DIR] [--out-bench DIR]
                                 [--out-mtz DIR] [--out-zoo DIR] [--out-budget DIR]

Writes, deterministically (fixed seeds, 2 threads, CPU), by default the groups "examples" and "tests":

- `onnxmerge/examples/`: `fashion_lenet.onnx` (Fashion-MNIST, input (N,1,28,28)), `digits_lenet.onnx`
  (FSDD log-spectrograms, input (N,1,32,32)), `fashion_eval.npz` (first 1000 of the Fashion-MNIST test
  split), `digits_eval.npz` (all 300 FSDD test recordings), `models.json`;
- `tests/models/`: LeNet, VGG, MobileNet and ResNet-style models on MNIST / Fashion-MNIST (all input
  (N,1,28,28)), `mnist_eval.npz` and `fashion_eval.npz` (first 500 of each test split), `models.json`.

and, only when asked for (`--group bench`, `--only NAME`, or `ensure_bench_models()` from another
script), the group "bench": models for reproducing the NeuralMerger paper's experiments (Chou et al.,
IJCAI 2018), all input (N,1,32,32), in `build/bench_models/` (git-ignored, not shipped):
`paper_lenet_fsdd.onnx` and `paper_lenet_fashion32.onnx` (the paper's LeNet, experiment 4.1, on FSDD and
on Fashion-MNIST resized to 32x32), `vgg_fashion32.onnx` and `zf_mnist32.onnx` (small VGG- and
ZF-style nets, experiment 4.2), `digits_eval.npz`, `fashion32_eval.npz`, `mnist32_eval.npz` (the full
test splits, images resized like the training data), `models.json`. About 13 minutes on 2 idle
cores (measured per step; far longer when other jobs share the cores).

The group "mtz" (`--group mtz`, `ensure_mtz_models()`) holds the Multi-Task Zipping paper's models, in
`build/mtz_models/`. The group "zoo" (`--group zoo`, `ensure_zoo_models()`) trains tools/zoo.py's compact
torchvision-style `MobileNetV3Small` (Hardswish, squeeze-excitation with Hardsigmoid, depthwise convs) and
`EfficientNetB0` (SiLU, squeeze-excitation with Sigmoid, depthwise convs, residual Adds) on MNIST and on
Fashion-MNIST, input (N,1,28,28) (their 3-channel stem conv replaced by a 1-channel one, of stride 1 in
MobileNetV3), four independently initialised models, in `build/zoo_models/` with `mnist_test.npz` and
`fashion_test.npz` (the full test splits) and `models.json`.

The group "budget" (`--group budget`, `ensure_budget_models()`) is issue 18's acceptance suite for the
budgeted search (`--max-loss`; tools/bench/budget_search.py): twenty-two independently initialised models (the
last seven, `*_h`, those of its held-out half), each
with its own seed and recipe, of five architectures (LeNet with 6/16 channels, a narrow VGG of 8-32
channels and a 64-wide fc, a narrow depthwise-separable MobileNet, a narrow ResNet, an MLP 256-128) on MNIST
and Fashion-MNIST (input (N,1,28,28)) and on spoken digits (FSDD, (N,1,32,32)), in `build/budget_models/`
with `mnist_test.npz`, `fashion_test.npz`, `digits_test.npz` (the full test splits), the calibration files
`mnist_calib.npz`, `fashion_calib.npz`, `digits_calib.npz` (samples of each TRAIN split, drawn at random
with a fixed seed: BUDGET_CALIB), the validation files `mnist_valid.npz`, `fashion_valid.npz`,
`digits_valid.npz` (the part of each train split held back from the models' training: BUDGET_VALIDATION)
and `models.json`.

Data comes from `onnxmerge.data.load_named` (the real datasets in `../shared/data` or
`$ONNXMERGE_DATA`), preprocessed exactly as recorded in each model's `preprocessing` entry.
Every model is exported with the legacy TorchScript exporter (opset 17, input "input", output
"logits", dynamic batch), in eval mode but with `training=TrainingMode.PRESERVE`, which keeps the
BatchNormalization nodes (the default EVAL mode folds them into the Conv before export), so that
onnxmerge's own BN-folding pass is exercised on real models. Each export is checked: onnx.checker,
only the allowed operators, BatchNormalization present where the model has BN, and onnxruntime
against torch on the eval subset.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP threads that sleep while waiting instead of spinning: on 2 cores that other jobs share, spinning
# made training up to 10x slower (the results are the same: threads and algorithms do not change). Only
# takes effect where this module imports torch first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from onnxmerge.data import Dataset, load_named, save_npz  # noqa: E402

ALLOWED_OPS = {
    "Conv", "Gemm", "MatMul", "Add", "BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid",
    "Tanh", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Concat", "Softmax",
    "Pad", "Dropout", "Identity", "Constant",
}
OPSET = 17
THREADS = 2


# ----------------------------------------------------------------------------------------------
# architectures


class LeNet(nn.Module):
    """conv5x5(8)-BN-ReLU-maxpool2, conv5x5(16)-BN-ReLU-maxpool2, fc120-ReLU, fc84-ReLU, fc10.
    28x28 inputs use padding 2 on the first conv, 32x32 inputs none: both reach 16x5x5 = 400."""

    def __init__(self, size: int = 28, c1: int = 8, c2: int = 16, classes: int = 10):
        super().__init__()
        pad = {28: 2, 32: 0}[size]
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 5, padding=pad), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 25, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class VGG(nn.Module):
    """Three blocks of [conv3x3-BN-ReLU x2, maxpool2] (widths 16, 32, 48: 28 -> 14 -> 7 -> 3),
    then fc(48*3*3 -> 128)-ReLU-fc(10)."""

    def __init__(self, widths=(16, 32, 48), hidden: int = 128, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for w in widths:
            layers += _conv_bn_relu(cin, w) + _conv_bn_relu(w, w) + [nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * 3 * 3, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class DepthwiseSeparable(nn.Sequential):
    """depthwise conv3x3 (groups=cin)-BN-ReLU6, pointwise conv1x1-BN-ReLU6."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
        )


class MobileNet(nn.Module):
    """stem conv3x3(16)-BN-ReLU6, five depthwise-separable blocks
    (16->32 s2, 32->32, 32->64 s2, 64->64, 64->128 s2: 28 -> 14 -> 7 -> 4), GlobalAveragePool,
    Flatten, fc(128 -> 10)."""

    BLOCKS = ((16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2))

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(*[DepthwiseSeparable(a, b, s) for a, b, s in self.BLOCKS])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.BLOCKS[-1][1], classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut (identity, or conv1x1 stride s-BN), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """stem conv3x3(16, stride 2)-BN-ReLU (28 -> 14), basic blocks 16->16 (identity shortcut),
    16->32 stride 2 (1x1 projection shortcut, 14 -> 7), 32->32 (identity), GlobalAveragePool,
    Flatten, fc(32 -> 10)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class PaperLeNet(nn.Module):
    """NeuralMerger's LeNet (Chou et al., IJCAI 2018, experiment 4.1), no BatchNorm:
    conv5x5(32, padding 2)-ReLU-maxpool2, conv5x5(64, padding 2)-ReLU-maxpool2 (32 -> 16 -> 8),
    flatten (64*8*8 = 4096), fc1024-ReLU, fc10."""

    def __init__(self, size: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 1024), nn.ReLU(), nn.Linear(1024, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class VGGStyle(nn.Module):
    """A small VGG (the paper's experiment 4.2 merges a VGG-16-avg with a ZF-net): blocks
    [conv3x3(32)-BN-ReLU x2, maxpool2], [conv3x3(64)-BN-ReLU x2, maxpool2], [conv3x3(128)-BN-ReLU,
    maxpool2] (32 -> 16 -> 8 -> 4), flatten (128*4*4 = 2048), fc256-ReLU, fc10. `widths` and `fc` set
    the three blocks' channels and the hidden fc's width (the budget group's narrow VGG: 8, 16, 32; 64)."""

    def __init__(self, size: int = 32, classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128), fc: int = 256):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(1, a), *_conv_bn_relu(a, a), nn.MaxPool2d(2),
            *_conv_bn_relu(a, b), *_conv_bn_relu(b, b), nn.MaxPool2d(2),
            *_conv_bn_relu(b, c), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * (size // 8) ** 2, fc), nn.ReLU(), nn.Linear(fc, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class ZFStyle(nn.Module):
    """A small ZF-net (fewer, larger-kernel layers; the paper's experiment 4.2):
    conv7x7(32, stride 2, padding 3)-BN-ReLU (32 -> 16), maxpool2 (-> 8), conv5x5(64, padding 2)-BN-ReLU,
    maxpool2 (-> 4), conv3x3(96, padding 1)-BN-ReLU, flatten (96*4*4 = 1536), fc256-ReLU, fc10."""

    def __init__(self, size: int = 32, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 96, 3, padding=1, bias=False), nn.BatchNorm2d(96), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(96 * (size // 8) ** 2, 256), nn.ReLU(), nn.Linear(256, classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; Multi-Task Zipping, He et al. NeurIPS 2018, Table 1), no
    BatchNorm: flatten (1*28*28 = 784), fc300-ReLU, fc100-ReLU, fc10."""

    # hidden layers whose units permute_hidden may reorder: (producer, consumer, consumer inputs per unit)
    PERMUTABLE = (("classifier.1", "classifier.3", 1), ("classifier.3", "classifier.5", 1))

    def __init__(self, classes: int = 10):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, classes)
        )

    def forward(self, x):
        return self.classifier(x)


class CaffeLeNet5(nn.Module):
    """Caffe's LeNet-5 (examples/mnist/lenet.prototxt; Multi-Task Zipping, He et al. NeurIPS 2018,
    Table 2), no BatchNorm and no ReLU after the convolutions: conv5x5(20)-maxpool2,
    conv5x5(50)-maxpool2 (valid padding: 28 -> 24 -> 12 -> 8 -> 4), flatten (50*4*4 = 800),
    fc500-ReLU, fc10."""

    # conv2's 50 output channels reach fc1 as channel-major blocks of 4*4 = 16 features
    PERMUTABLE = (("features.0", "features.2", 1), ("features.2", "classifier.1", 16),
                  ("classifier.1", "classifier.3", 1))

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(), nn.Linear(500, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class NarrowMobileNet(nn.Module):
    """A narrow MobileNet (the budget group): stem conv3x3(8)-BN-ReLU6, four depthwise-separable blocks
    (8->16 s2, 16->32, 32->64 s2, 64->128 s2: 28 -> 14 -> 7 -> 4, or 32 -> 16 -> 8 -> 4),
    GlobalAveragePool, Flatten, fc(128 -> 10)."""

    BLOCKS = ((8, 16, 2), (16, 32, 1), (32, 64, 2), (64, 128, 2))

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(*[DepthwiseSeparable(a, b, s) for a, b, s in self.BLOCKS])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(self.BLOCKS[-1][1], classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class NarrowResNet(nn.Module):
    """A narrow ResNet (the budget group): stem conv3x3(12, stride 2)-BN-ReLU (28 -> 14), basic blocks
    12->12 (identity shortcut), 12->24 stride 2 and 24->48 stride 2 (1x1 projection shortcuts: 14 -> 7
    -> 4), GlobalAveragePool, Flatten, fc(48 -> 10)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(12, 12, 1), BasicBlock(12, 24, 2), BasicBlock(24, 48, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class MLP(nn.Module):
    """A multilayer perceptron (the budget group), no BatchNorm: flatten (size*size), fc256-ReLU,
    fc128-ReLU, fc10."""

    def __init__(self, size: int = 28, classes: int = 10):
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(size * size, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, classes)
        )

    def forward(self, x):
        return self.classifier(x)


def _zoo_grey(name: str, stem_stride: int | None = None) -> nn.Module:
    """tools/zoo.py's `name` (MobileNetV3Small, EfficientNetB0) for 1-channel images: its stem conv
    (3 -> C channels) replaced by a freshly initialised 1 -> C conv of the same kernel and padding, and of
    the same stride unless `stem_stride` is given; everything else as tools/zoo.py builds it (its adaptive
    pooling takes 28x28 as well as 32x32)."""
    tools = str(REPO / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import zoo  # tools/zoo.py (imported here: only the zoo group needs it)

    model = getattr(zoo, name)()
    stem = model.features[0][0]
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 3, name
    model.features[0][0] = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem_stride or stem.stride,
                                     stem.padding, bias=stem.bias is not None)
    return model


# architecture name -> constructor taking the input image size (square, 1 channel)
ARCHS = {
    "lenet": lambda size: LeNet(size),
    "vgg": lambda size: VGG(),
    "mobilenet": lambda size: MobileNet(),
    "resnet": lambda size: ResNet(),
    "paper_lenet": lambda size: PaperLeNet(size),
    "vgg_style": lambda size: VGGStyle(size),
    "zf_style": lambda size: ZFStyle(size),
    "lenet300_100": lambda size: LeNet300(),
    "caffe_lenet5": lambda size: CaffeLeNet5(),
    # stem stride 1: with the zoo's stride-2 stem, the stride-2 first block leaves 7x7x8 of a 28x28 image after
    # two layers, and 3 epochs reached only 98.11% (MNIST) / 86.88% (Fashion-MNIST, train loss 0.34: underfit)
    "mobilenet_v3": lambda size: _zoo_grey("MobileNetV3Small", stem_stride=1),
    "efficientnet": lambda size: _zoo_grey("EfficientNetB0"),
    # the budget group's (issue 18's acceptance suite): narrower than the tests group's, any input size
    "lenet6": lambda size: LeNet(size, c1=6, c2=16),
    "vgg_narrow": lambda size: VGGStyle(size, widths=(8, 16, 32), fc=64),  # narrow: 28 or 32 -> 3 or 4
    "mobilenet_narrow": lambda size: NarrowMobileNet(),
    "resnet_narrow": lambda size: NarrowResNet(),
    "mlp": lambda size: MLP(size),
}
# operators an architecture's export may use beyond ALLOWED_OPS (the zoo group's activations and SE scaling)
EXTRA_OPS = {
    "mobilenet_v3": {"HardSwish", "HardSigmoid", "Mul"},
    "efficientnet": {"Mul"},  # SiLU exports as Sigmoid * x
}


# ----------------------------------------------------------------------------------------------
# what to train


GROUPS = ("examples", "tests", "bench", "mtz", "zoo", "budget")
DEFAULT_GROUPS = ("examples", "tests")  # what a plain run trains; "bench", "mtz", "zoo" and "budget" only when asked for


@dataclass
class Spec:
    name: str  # file stem, unique within the group (the same name may appear in two groups)
    group: str  # one of GROUPS
    arch: str
    dataset: str  # load_named name
    epochs: int
    lr: float
    batch: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    input_size: int | None = None  # load_named(size=...): None = the dataset's own size
    notes: dict = field(default_factory=dict)  # why these settings (copied into models.json)
    # after training, reorder the hidden units with permute_hidden(model, permute_seed) (architectures
    # with a PERMUTABLE table only); None: keep them as trained
    permute_seed: int | None = None
    # train on the first `train_samples` of the train split only; the rest is a held-out validation split
    # (VALIDATION_FROM) for choices made during a merge (mtz --tolerance --validation). None: all of it
    train_samples: int | None = None

    @property
    def size(self) -> int:
        if self.input_size is not None:
            return self.input_size
        return 32 if self.dataset == "fsdd" else 28


# the NeuralMerger paper's experiments (Chou et al., IJCAI 2018): 4.1 merges two LeNets (Fashion-MNIST
# and spoken digits), 4.2 a VGG-16-avg and a ZF-net; all bench models take (N,1,32,32)
_BENCH_NOTE = ("NeuralMerger benchmark model: Adam with cosine decay to 0, no augmentation; "
               "settings chosen for good accuracy with the whole bench group under ~20 min on 2 CPU cores")
BENCH_SPECS = [
    Spec("paper_lenet_fsdd", "bench", "paper_lenet", "fsdd", epochs=40, lr=1e-3, batch=64, weight_decay=1e-4,
         notes={"paper": "experiment 4.1, LeNet on spoken digits (FSDD log-spectrograms, 32x32)",
                "why": "only 2,700 training recordings: many epochs, small batches and a little weight decay",
                "setup": _BENCH_NOTE}),
    Spec("paper_lenet_fashion32", "bench", "paper_lenet", "fashion-mnist", epochs=4, lr=1e-3, input_size=32,
         notes={"paper": "experiment 4.1, LeNet on Fashion-MNIST, resized to 32x32 like the spectrograms",
                "why": "no BatchNorm and a 4096x1024 fc layer: the conservative lr 1e-3; 4 epochs of 60k",
                "setup": _BENCH_NOTE}),
    Spec("vgg_fashion32", "bench", "vgg_style", "fashion-mnist", epochs=3, lr=2e-3, input_size=32,
         notes={"paper": "experiment 4.2 (VGG-16-avg), a small VGG-style net on Fashion-MNIST at 32x32",
                "why": "BatchNorm allows lr 2e-3; 3 epochs of 60k (the costliest bench model per epoch)",
                "setup": _BENCH_NOTE}),
    Spec("zf_mnist32", "bench", "zf_style", "mnist", epochs=3, lr=2e-3, input_size=32,
         notes={"paper": "experiment 4.2 (ZF-net), a small ZF-style net on MNIST at 32x32",
                "why": "BatchNorm allows lr 2e-3; cheap per epoch, 3 epochs of 60k",
                "setup": _BENCH_NOTE}),
]

# the Multi-Task Zipping paper's experiments (He, Zhou, Thiele, NeurIPS 2018): Table 1 zips two
# LeNet-300-100 on MNIST, Table 2 two LeNet-5 on MNIST ("same task") and LeNet-5 on MNIST + on
# Fashion-MNIST ("different tasks"); both MNIST pairs "with hidden neurons randomly permuted", which
# the twins here get after training (seeded, function-preserving, checked on the test split). Also two
# better-trained ResNets (the tests group's architecture, with BatchNorm). All input (N,1,28,28).
_MTZ_NOTE = ("Multi-Task Zipping benchmark model: Adam with cosine decay to 0, no augmentation; "
             "settings chosen for the paper's error rates with the whole mtz group under ~20 min on 2 CPU cores")
_MTZ_PERM = ("hidden units randomly permuted after training (permute_hidden: rows of each hidden layer's "
             "weights and biases and the matching inputs of the next layer; logits unchanged)")
_MTZ_LENET300 = dict(epochs=20, lr=1e-3, batch=64)
_MTZ_LENET5 = dict(epochs=10, lr=1e-3, batch=64)
VALIDATION_FROM = 55_000  # the *_55k models train on the train split up to here; the rest validates
MTZ_SPECS = [
    Spec("lenet300_mnist_s0", "mtz", "lenet300_100", "mnist", **_MTZ_LENET300, seed=0, permute_seed=100,
         notes={"paper": "Table 1, LeNet-300-100 on MNIST (paper: 1.57% test error), model A", "permuted": _MTZ_PERM,
                "why": "cheap per epoch: 20 epochs, batch 64", "setup": _MTZ_NOTE}),
    Spec("lenet300_mnist_s1", "mtz", "lenet300_100", "mnist", **_MTZ_LENET300, seed=1, permute_seed=101,
         notes={"paper": "Table 1, LeNet-300-100 on MNIST (paper: 1.60% test error), model B", "permuted": _MTZ_PERM,
                "why": "as lenet300_mnist_s0, another initialisation and data order", "setup": _MTZ_NOTE}),
    Spec("lenet5_mnist_s0", "mtz", "caffe_lenet5", "mnist", **_MTZ_LENET5, seed=0, permute_seed=200,
         notes={"paper": "Table 2, LeNet-5 on MNIST (paper: 0.89% test error), model A of both pairs",
                "permuted": _MTZ_PERM, "why": "10 epochs, batch 64", "setup": _MTZ_NOTE}),
    Spec("lenet5_mnist_s1", "mtz", "caffe_lenet5", "mnist", **_MTZ_LENET5, seed=1, permute_seed=201,
         notes={"paper": "Table 2, LeNet-5 on MNIST (paper: 0.95% test error), model B of the same-task pair",
                "permuted": _MTZ_PERM, "why": "as lenet5_mnist_s0, another initialisation and data order",
                "setup": _MTZ_NOTE}),
    Spec("lenet5_fashion", "mtz", "caffe_lenet5", "fashion-mnist", **_MTZ_LENET5, seed=2, permute_seed=202,
         notes={"paper": "Table 2, LeNet-5 on Fashion-MNIST, model B of the different-tasks pair",
                "permuted": _MTZ_PERM, "why": "the MNIST LeNet-5's settings", "setup": _MTZ_NOTE}),
    Spec("lenet5_mnist_55k", "mtz", "caffe_lenet5", "mnist", **_MTZ_LENET5, seed=3, train_samples=VALIDATION_FROM,
         notes={"paper": "the different-tasks pair (MNIST side): trained on the first 55,000 training images, so "
                         "that the last 5,000 are a validation split the model has not seen (mtz --tolerance)",
                "why": "the other LeNet-5s' settings", "setup": _MTZ_NOTE}),
    Spec("lenet5_fashion_55k", "mtz", "caffe_lenet5", "fashion-mnist", **_MTZ_LENET5, seed=4,
         train_samples=VALIDATION_FROM,
         notes={"paper": "the different-tasks pair (Fashion-MNIST side), trained as lenet5_mnist_55k",
                "why": "the other LeNet-5s' settings", "setup": _MTZ_NOTE}),
    Spec("resnet_mnist_55k", "mtz", "resnet", "mnist", epochs=5, lr=4e-3, seed=5, train_samples=VALIDATION_FROM,
         notes={"paper": "the ResNet-style pair (MNIST side), trained as lenet5_mnist_55k: the last 5,000 training "
                         "images are its validation split", "why": "resnet_mnist's settings", "setup": _MTZ_NOTE}),
    Spec("resnet_fashion_55k", "mtz", "resnet", "fashion-mnist", epochs=5, lr=4e-3, seed=6,
         train_samples=VALIDATION_FROM,
         notes={"paper": "the ResNet-style pair (Fashion-MNIST side), trained as resnet_mnist_55k",
                "why": "resnet_fashion's settings", "setup": _MTZ_NOTE}),
    Spec("resnet_mnist", "mtz", "resnet", "mnist", epochs=5, lr=4e-3, seed=0,
         notes={"why": "the tests group's resnet_mnist trained 5 epochs instead of 2, for a better baseline",
                "setup": _MTZ_NOTE}),
    Spec("resnet_fashion", "mtz", "resnet", "fashion-mnist", epochs=5, lr=4e-3, seed=1,
         notes={"why": "the tests group's resnet_fashion trained 5 epochs instead of 2 (seed 1), for a better "
                       "baseline", "setup": _MTZ_NOTE}),
]

# trained versions of tools/zoo.py's MobileNetV3-Small and EfficientNet-B0 (random-weight graphs there), for
# merging real modern architectures (tools/bench/zoo_trained.py); all input (N,1,28,28), each model its own seed
_ZOO_NOTE = ("zoo benchmark model: tools/zoo.py's architecture with a 1-channel stem; Adam with cosine decay to 0, "
             "no augmentation; settings chosen for MNIST >= 98.5% / Fashion-MNIST >= 88% with the whole zoo group "
             "in about 15 min on 2 busy CPU cores")
ZOO_SPECS = [
    Spec("mobilenet_v3_mnist", "zoo", "mobilenet_v3", "mnist", epochs=2, lr=4e-3, seed=10,
         notes={"why": "stem stride 1 (see ARCHS); about 110 s per epoch on 2 busy cores: 2 epochs", "setup": _ZOO_NOTE}),
    Spec("mobilenet_v3_fashion", "zoo", "mobilenet_v3", "fashion-mnist", epochs=3, lr=4e-3, seed=11,
         notes={"why": "as mobilenet_v3_mnist, another initialisation; 3 epochs (1 epoch: 86.1%)", "setup": _ZOO_NOTE}),
    Spec("efficientnet_mnist", "zoo", "efficientnet", "mnist", epochs=3, lr=4e-3, seed=12,
         notes={"why": "the zoo's stride-2 stem (stride 1 doubles the time per epoch); about 135 s per epoch on 2 "
                       "busy cores: 3 epochs", "setup": _ZOO_NOTE}),
    Spec("efficientnet_fashion", "zoo", "efficientnet", "fashion-mnist", epochs=3, lr=4e-3, seed=13,
         notes={"why": "as efficientnet_mnist, another initialisation (1 epoch: 86.3%)", "setup": _ZOO_NOTE}),
]

# issue 18's acceptance suite (tools/bench/budget_search.py): pairs the budgeted search (--max-loss) was not
# tuned on. Five architectures (LeNet, narrow VGG, narrow MobileNet, narrow ResNet, MLP), each on MNIST and on
# Fashion-MNIST (28x28) and on spoken digits (FSDD log-spectrograms, 32x32), every model from its own seed
# (independently initialised) and with its own recipe (epochs, lr, batch, weight decay varied a little)
_BUDGET_NOTE = ("budget acceptance-suite model (issue 18): Adam with cosine decay to 0, no augmentation; its own seed "
                "and recipe; settings chosen for the whole budget group in about 15 min on 2 busy CPU cores")
_FSDD_WHY = "only 2,700 training recordings: many epochs, small batches and a little weight decay"
BUDGET_SPECS = [
    Spec("lenet_mnist", "budget", "lenet6", "mnist", epochs=3, lr=2e-3, batch=128, seed=20,
         notes={"why": "LeNet-5's 6/16 channels; cheap per epoch: 3 epochs", "setup": _BUDGET_NOTE}),
    Spec("lenet_fashion", "budget", "lenet6", "fashion-mnist", epochs=3, lr=3e-3, batch=96, seed=21,
         notes={"why": "as lenet_mnist, a larger lr and smaller batches", "setup": _BUDGET_NOTE}),
    Spec("vgg_mnist", "budget", "vgg_narrow", "mnist", epochs=2, lr=3e-3, batch=128, seed=22,
         notes={"why": "BatchNorm allows lr 3e-3; 2 epochs", "setup": _BUDGET_NOTE}),
    Spec("vgg_fashion", "budget", "vgg_narrow", "fashion-mnist", epochs=3, lr=2e-3, batch=128, seed=23,
         notes={"why": "Fashion-MNIST is harder: 3 epochs", "setup": _BUDGET_NOTE}),
    Spec("mobilenet_mnist", "budget", "mobilenet_narrow", "mnist", epochs=2, lr=5e-3, batch=128, seed=24,
         notes={"why": "depthwise convs train slowly at small lr: 5e-3, 2 epochs", "setup": _BUDGET_NOTE}),
    Spec("mobilenet_fashion", "budget", "mobilenet_narrow", "fashion-mnist", epochs=3, lr=4e-3, batch=128, seed=25,
         notes={"why": "as mobilenet_mnist, 3 epochs for the harder task", "setup": _BUDGET_NOTE}),
    Spec("resnet_mnist", "budget", "resnet_narrow", "mnist", epochs=2, lr=4e-3, batch=128, seed=26,
         notes={"why": "BatchNorm and shortcuts: lr 4e-3, 2 epochs", "setup": _BUDGET_NOTE}),
    Spec("resnet_fashion", "budget", "resnet_narrow", "fashion-mnist", epochs=2, lr=3e-3, batch=96, seed=27,
         notes={"why": "as resnet_mnist, a smaller lr and smaller batches", "setup": _BUDGET_NOTE}),
    Spec("mlp_mnist", "budget", "mlp", "mnist", epochs=4, lr=1e-3, batch=128, seed=28,
         notes={"why": "no BatchNorm: lr 1e-3; very cheap per epoch: 4 epochs", "setup": _BUDGET_NOTE}),
    Spec("mlp_fashion", "budget", "mlp", "fashion-mnist", epochs=4, lr=1.5e-3, batch=64, seed=29, weight_decay=1e-5,
         notes={"why": "as mlp_mnist, smaller batches and a touch of weight decay", "setup": _BUDGET_NOTE}),
    Spec("lenet_fsdd", "budget", "lenet6", "fsdd", epochs=30, lr=2e-3, batch=64, seed=30, weight_decay=1e-4,
         notes={"why": _FSDD_WHY, "setup": _BUDGET_NOTE}),
    Spec("vgg_fsdd", "budget", "vgg_narrow", "fsdd", epochs=25, lr=2e-3, batch=64, seed=31, weight_decay=1e-4,
         notes={"why": _FSDD_WHY, "setup": _BUDGET_NOTE}),
    Spec("mobilenet_fsdd", "budget", "mobilenet_narrow", "fsdd", epochs=30, lr=4e-3, batch=64, seed=32,
         weight_decay=1e-4, notes={"why": _FSDD_WHY + "; depthwise convs: lr 4e-3", "setup": _BUDGET_NOTE}),
    Spec("resnet_fsdd", "budget", "resnet_narrow", "fsdd", epochs=25, lr=3e-3, batch=64, seed=33, weight_decay=1e-4,
         notes={"why": _FSDD_WHY, "setup": _BUDGET_NOTE}),
    Spec("mlp_fsdd", "budget", "mlp", "fsdd", epochs=40, lr=1e-3, batch=32, seed=34, weight_decay=1e-4,
         notes={"why": _FSDD_WHY + "; no BatchNorm: lr 1e-3, batch 32", "setup": _BUDGET_NOTE}),
    # the held-out half (tools/bench/budget_search.py HELDOUT), trained 2026-12-06 after the search's
    # development had looked at the report half's runs: new seeds and recipes, pairs drawn at random
    Spec("lenet_mnist_h", "budget", "lenet6", "mnist", epochs=4, lr=1.5e-3, batch=64, seed=40,
         notes={"why": "held-out half: as lenet_mnist, smaller batches, a smaller lr, 4 epochs", "setup": _BUDGET_NOTE}),
    Spec("lenet_fashion_h", "budget", "lenet6", "fashion-mnist", epochs=3, lr=2.5e-3, batch=128, seed=41,
         weight_decay=1e-5, notes={"why": "held-out half: as lenet_fashion, larger batches", "setup": _BUDGET_NOTE}),
    Spec("mlp_mnist_h", "budget", "mlp", "mnist", epochs=5, lr=8e-4, batch=96, seed=42,
         notes={"why": "held-out half: as mlp_mnist, a smaller lr, 5 epochs", "setup": _BUDGET_NOTE}),
    Spec("mlp_fashion_h", "budget", "mlp", "fashion-mnist", epochs=4, lr=1.2e-3, batch=128, seed=43,
         notes={"why": "held-out half: as mlp_fashion, larger batches", "setup": _BUDGET_NOTE}),
    Spec("vgg_mnist_h", "budget", "vgg_narrow", "mnist", epochs=2, lr=2.5e-3, batch=96, seed=44,
         notes={"why": "held-out half: as vgg_mnist, smaller batches", "setup": _BUDGET_NOTE}),
    Spec("mobilenet_fsdd_h", "budget", "mobilenet_narrow", "fsdd", epochs=30, lr=3e-3, batch=48, seed=45,
         weight_decay=1e-4, notes={"why": _FSDD_WHY + "; held-out half: lr 3e-3, batch 48", "setup": _BUDGET_NOTE}),
    Spec("resnet_fsdd_h", "budget", "resnet_narrow", "fsdd", epochs=25, lr=2.5e-3, batch=64, seed=46,
         weight_decay=2e-4, notes={"why": _FSDD_WHY + "; held-out half: more weight decay", "setup": _BUDGET_NOTE}),
]
# the budget group's validation files: dataset -> (file name, samples of the TRAIN split held back from the
# models' training by Dataset.split(n, seed)). The search chooses on them (--validation): measured on data
# the originals trained on, a merged model's loss came out about 1.5 times its loss on the test split (the
# originals know their training samples better than unseen ones, and a merged model forgets some of
# that; the LeNet pair of the tuning half, zipper --share 1 and 2: mnist -0.42 / -0.54 points on 10,000
# training samples against -0.26 / -0.33 on the test split, fashion -1.09 / -1.80 against -0.67 / -1.25),
# so the 1-point budget refused models within a point on unseen data. FSDD's train split holds 2,700
# recordings (sorted by digit: a random split keeps every digit in both parts).
BUDGET_VALIDATION = {
    "mnist": ("mnist_valid.npz", 10000, 3),
    "fashion-mnist": ("fashion_valid.npz", 10000, 4),
    "fsdd": ("digits_valid.npz", 500, 5),
}
# the budget group's calibration files: dataset -> (file name, samples drawn at random by Dataset.subset(n,
# seed) from the part of the TRAIN split the models trained on). 20,000 where the split allows: on the
# LeNet pair of the tuning half, zipper --share 2 calibrated on 20,000 lost 0.33 / 0.76 points on the test
# split against 0.42 / 1.46 on 5,000 (each task's 1,000 of the 2,000 steps see a sample about 3 times instead of 16)
BUDGET_CALIB = {
    "mnist": ("mnist_calib.npz", 20000, 0),
    "fashion-mnist": ("fashion_calib.npz", 20000, 1),
    "fsdd": ("digits_calib.npz", 2000, 2),
}


def budget_split(ds: str, train: Dataset) -> tuple[Dataset, Dataset]:
    """(the part of dataset `ds`'s train split the budget group trains on, the part held back to validate
    on: BUDGET_VALIDATION)."""
    _, n, seed = BUDGET_VALIDATION[ds]
    return train.split(n, seed)


SPECS = [
    Spec("fashion_lenet", "examples", "lenet", "fashion-mnist", epochs=3, lr=2e-3),
    Spec("digits_lenet", "examples", "lenet", "fsdd", epochs=25, lr=2e-3, batch=64, weight_decay=1e-4),
    Spec("lenet_mnist", "tests", "lenet", "mnist", epochs=2, lr=2e-3),
    Spec("lenet_fashion", "tests", "lenet", "fashion-mnist", epochs=2, lr=2e-3),
    Spec("vgg_fashion", "tests", "vgg", "fashion-mnist", epochs=2, lr=2e-3),
    Spec("mobilenet_mnist", "tests", "mobilenet", "mnist", epochs=2, lr=4e-3),
    Spec("mobilenet_fashion", "tests", "mobilenet", "fashion-mnist", epochs=2, lr=4e-3),
    Spec("resnet_mnist", "tests", "resnet", "mnist", epochs=2, lr=4e-3),
    Spec("resnet_fashion", "tests", "resnet", "fashion-mnist", epochs=2, lr=4e-3),
    # independently initialised twins (seed 1): their channels are in an arbitrary order relative to
    # the seed-0 models', which is what channel matching (zipper --match hungarian) is for
    Spec("lenet_fashion_seed1", "tests", "lenet", "fashion-mnist", epochs=2, lr=2e-3, seed=1),
    Spec("mobilenet_fashion_seed1", "tests", "mobilenet", "fashion-mnist", epochs=2, lr=4e-3, seed=1),
    *BENCH_SPECS,
    *MTZ_SPECS,
    *ZOO_SPECS,
    *BUDGET_SPECS,
]

# the eval subsets: (group, dataset) -> (file name, how many of the test split (None = all),
# load_named size (None = the dataset's own)); a group's models on one dataset share one input size
EVAL_SETS = {
    ("examples", "fashion-mnist"): ("fashion_eval.npz", 1000, None),
    ("examples", "fsdd"): ("digits_eval.npz", None, None),
    ("tests", "mnist"): ("mnist_eval.npz", 500, None),
    ("tests", "fashion-mnist"): ("fashion_eval.npz", 500, None),
    ("bench", "fsdd"): ("digits_eval.npz", None, None),
    ("bench", "fashion-mnist"): ("fashion32_eval.npz", None, 32),
    ("bench", "mnist"): ("mnist32_eval.npz", None, 32),
    ("mtz", "mnist"): ("mnist_test.npz", None, None),
    ("mtz", "fashion-mnist"): ("fashion_test.npz", None, None),
    ("zoo", "mnist"): ("mnist_test.npz", None, None),
    ("zoo", "fashion-mnist"): ("fashion_test.npz", None, None),
    ("budget", "mnist"): ("mnist_test.npz", None, None),
    ("budget", "fashion-mnist"): ("fashion_test.npz", None, None),
    ("budget", "fsdd"): ("digits_test.npz", None, None),
}

for _s in SPECS:  # the tables agree: known group and architecture, an eval set of the model's size
    assert _s.group in GROUPS and _s.arch in ARCHS, _s.name
    assert EVAL_SETS[_s.group, _s.dataset][2] == _s.input_size, _s.name
    assert _s.permute_seed is None or _s.arch in ("lenet300_100", "caffe_lenet5"), _s.name  # has PERMUTABLE
assert len({(_s.group, _s.name) for _s in SPECS}) == len(SPECS)


# ----------------------------------------------------------------------------------------------
# training, export, checks


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def train(model: nn.Module, data: Dataset, spec: Spec) -> list[float]:
    """Adam, cross-entropy, learning rate cosine-decayed to 0 over all steps; leaves the model in eval mode."""
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    n = len(x)
    steps_per_epoch = (n + spec.batch - 1) // spec.batch
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(spec.seed)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    model.train()
    for _ in range(spec.epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * spec.batch : (i + 1) * spec.batch]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(round(total / n, 4))
    model.eval()
    return losses


@torch.no_grad()
def permute_hidden(model: nn.Module, seed: int) -> dict[str, int]:
    """Reorder the hidden units of `model` at random without changing its function: for each
    (producer, consumer, block) of `model.PERMUTABLE`, in order, a permutation p of the producer's
    outputs is drawn (`torch.randperm`, one generator seeded with `seed`); new output unit j of the
    producer (Linear row / Conv output channel, weight and bias) is old unit p[j], and the consumer's
    input features (Linear columns / Conv input channels) follow in blocks of `block` consecutive
    features per unit (a Conv's channel flattened channel-major into a Linear). Only per-unit
    operations (ReLU, MaxPool, Flatten) may lie between producer and consumer. Returns {producer: units}."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {}
    for prod_name, cons_name, block in model.PERMUTABLE:
        prod, cons = model.get_submodule(prod_name), model.get_submodule(cons_name)
        n = prod.weight.shape[0]
        if cons.weight.shape[1] != n * block:
            raise ValueError(f"{cons_name} has {cons.weight.shape[1]} inputs, not {n} units x {block}")
        p = torch.randperm(n, generator=gen)
        idx = (p[:, None] * block + torch.arange(block)[None, :]).reshape(-1)
        prod.weight.copy_(prod.weight[p])
        prod.bias.copy_(prod.bias[p])
        cons.weight.copy_(cons.weight[:, idx])
        sizes[prod_name] = n
    return sizes


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_logits(sess: ort.InferenceSession, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([sess.run(["logits"], {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def export(model: nn.Module, size: int, path: Path, extra_ops: set[str] = frozenset()) -> onnx.ModelProto:
    model.eval()
    dummy = torch.zeros(1, 1, size, size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), buf, dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            # PRESERVE on a model in eval mode: exported in inference mode, but without the eval-mode
            # peephole pass that folds BatchNorm into the preceding Conv
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )
    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = "onnxmerge tools/train_models.py"
    m.producer_version = f"torch {torch.__version__}"
    onnx.checker.check_model(m, full_check=True)
    ops = {n.op_type for n in m.graph.node}
    bad = ops - ALLOWED_OPS - set(extra_ops)
    if bad:
        raise SystemExit(f"{path.name}: exported graph uses operators outside the allowed set: {sorted(bad)}")
    has_bn = any(isinstance(mod, nn.BatchNorm2d) for mod in model.modules())
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    n_bn_torch = sum(isinstance(mod, nn.BatchNorm2d) for mod in model.modules())
    if has_bn and n_bn != n_bn_torch:
        raise SystemExit(f"{path.name}: {n_bn_torch} BatchNorm layers in torch but {n_bn} BatchNormalization nodes exported")
    path.write_bytes(m.SerializeToString())
    return m


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return round(float((logits.argmax(1) == y).mean()), 4)


def load_json(path: Path) -> dict:
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    return {}


def _subset_note(n: int | None, size: int | None) -> str:
    """How an eval file was made from the test split (models.json's eval_files)."""
    return ("first %d of the test split" % n if n else "all of the test split") + (
        f", resized to {size}x{size}" if size is not None else ""
    )


@contextmanager
def torch_settings():
    """2 threads and deterministic algorithms while training; the caller's settings afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def write_eval_set(group: str, ds: str, out_dir: Path) -> Dataset:
    """Write the eval file of `(group, ds)` (see EVAL_SETS) into `out_dir` and return its data."""
    fname, n, size = EVAL_SETS[group, ds]
    sub = load_named(ds, "test", limit=n, size=size)
    sub.preprocessing = {
        **sub.preprocessing,
        "subset": f"first {len(sub)} of the {ds} test split" if n is not None else f"all {len(sub)} of the {ds} test split",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npz(out_dir / fname, sub)
    return sub


def write_budget_sets(ds: str, out_dir: Path) -> Path:
    """The budget group's calibration and validation files of dataset `ds` (BUDGET_CALIB,
    BUDGET_VALIDATION) in `out_dir`: calibration samples drawn at random with a fixed seed from the part of
    the train split the models trained on, validation the part held back (never the test split)."""
    trained, held = budget_split(ds, load_named(ds, "train"))
    _, n_held, held_seed = BUDGET_VALIDATION[ds]
    fname, n, seed = BUDGET_CALIB[ds]
    sub = trained.subset(n, seed)
    sub.preprocessing = {**sub.preprocessing,
                         "subset": f"{len(sub)} drawn at random (Dataset.subset(n, seed={seed})) from the {len(trained)} "
                                   f"samples of the {ds} train split the budget models trained on"}
    held.preprocessing = {**held.preprocessing,
                          "subset": f"the {n_held} samples of the {ds} train split held back from the budget models' "
                                    f"training (Dataset.split(n, seed={held_seed}))"}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_npz(out_dir / BUDGET_VALIDATION[ds][0], held)
    return save_npz(out_dir / fname, sub)


def train_and_export(specs: list[Spec], out_dirs: dict[str, Path]) -> dict[str, dict[str, dict]]:
    """Train, export and check `specs`, write their groups' eval files and update each group's
    models.json (other models' entries are kept). Returns {group: {name: models.json entry}}."""
    cache: dict[tuple[str, str, int | None], Dataset] = {}

    def data(name: str, split: str, size: int | None) -> Dataset:
        if (name, split, size) not in cache:
            cache[name, split, size] = load_named(name, split, size=size)
        return cache[name, split, size]

    # eval subsets of the groups and datasets being (re)trained
    evals: dict[tuple[str, str], Dataset] = {}
    for group, ds in sorted({(s.group, s.dataset) for s in specs}):
        evals[group, ds] = write_eval_set(group, ds, out_dirs[group])
        if group == "budget":
            write_budget_sets(ds, out_dirs[group])

    results: dict[str, dict[str, dict]] = {g: {} for g in GROUPS}
    print(f"{'model':22} {'params':>8} {'epochs':>6} {'train s':>8} {'acc test':>9} {'acc eval':>9} "
          f"{'ort diff':>9} {'KiB':>7}")
    for spec in specs:
        t0 = time.time()
        set_seed(spec.seed)
        model = ARCHS[spec.arch](spec.size)
        train_ds = data(spec.dataset, "train", spec.input_size)
        if spec.train_samples is not None:
            train_ds = train_ds.take(spec.train_samples)
        if spec.group == "budget":
            train_ds = budget_split(spec.dataset, train_ds)[0]
        losses = train(model, train_ds, spec)
        t_train = time.time() - t0
        test = data(spec.dataset, "test", spec.input_size)
        permutation = None
        if spec.permute_seed is not None:
            before = torch_logits(model, test.x)
            weights = copy.deepcopy(model.state_dict())
            units = permute_hidden(model, spec.permute_seed)
            after = torch_logits(model, test.x)
            change = float(np.abs(after - before).max())
            moved = {k: float((v - weights[k]).abs().max()) for k, v in model.state_dict().items()}
            if change > 1e-4 or not (after.argmax(1) == before.argmax(1)).all():
                raise SystemExit(f"{spec.name}: permuting the hidden units changed the logits by {change:.3g}")
            if not all(moved[f"{name}.weight"] > 0 for name in units):
                raise SystemExit(f"{spec.name}: permute_hidden left a layer's units in place")
            permutation = {
                "seed": spec.permute_seed, "layers": units,
                "how": "tools/train_models.py permute_hidden(model, seed) after training: torch.randperm per "
                       "layer, in this order, from one torch.Generator seeded with seed",
                "max_abs_logit_change_on_test": float(f"{change:.3g}"),
            }
        path = out_dirs[spec.group] / f"{spec.name}.onnx"
        export(model, spec.size, path, EXTRA_OPS.get(spec.arch, frozenset()))
        sess = ort_session(path)
        sub = evals[spec.group, spec.dataset]
        ort_sub = ort_logits(sess, sub.x)
        diff = float(np.abs(ort_sub - torch_logits(model, sub.x)).max())
        if diff > 1e-4:
            raise SystemExit(f"{path.name}: onnxruntime differs from torch by {diff:.3g} (> 1e-4)")
        acc_full = accuracy(ort_logits(sess, test.x), test.y)
        acc_sub = accuracy(ort_sub, sub.y)
        params = sum(p.numel() for p in model.parameters())
        fname = EVAL_SETS[spec.group, spec.dataset][0]
        training = {
            "split": ("train" if spec.train_samples is None else f"train, first {spec.train_samples}")
                     + (f", less the {BUDGET_VALIDATION[spec.dataset][1]} samples held back to validate on "
                        f"({BUDGET_VALIDATION[spec.dataset][0]})" if spec.group == "budget" else ""),
            "samples": len(train_ds), "epochs": spec.epochs, "optimizer": "Adam",
            "lr": spec.lr, "schedule": "cosine to 0 over all steps", "weight_decay": spec.weight_decay,
            "batch": spec.batch, "seed": spec.seed, "threads": THREADS, "loss": "cross-entropy",
            "augmentation": "none", "final_epoch_loss": losses[-1], "torch": torch.__version__,
        }
        if spec.notes:
            training["notes"] = spec.notes
        if permutation is not None:
            training["hidden_units_permuted"] = permutation
        results[spec.group][spec.name] = {
            "file": path.name,
            "task": spec.dataset,
            "architecture": spec.arch,
            "description": " ".join((type(model).__doc__ or "").split()),
            "input": {"name": "input", "shape": ["N", 1, spec.size, spec.size], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["N", 10], "dtype": "float32"},
            "params": params,
            "onnx_ops": sorted({n.op_type for n in onnx.load(str(path)).graph.node}),
            "training": training,
            "accuracy": {"test_full": acc_full, "eval_subset": acc_sub, "test_samples": len(test), "eval_samples": len(sub)},
            "eval_file": fname,
            "ort_vs_torch_max_abs_diff_on_eval": float(f"{diff:.3g}"),
            "max_abs_logit_on_eval": round(float(np.abs(ort_sub).max()), 3),
            "preprocessing": train_ds.preprocessing,
        }
        print(f"{spec.name:22} {params:8d} {spec.epochs:6d} {t_train:8.1f} {acc_full:9.4f} {acc_sub:9.4f} "
              f"{diff:9.2g} {path.stat().st_size / 1024:7.0f}", flush=True)
        # written after each model, so that an interrupted run keeps what it finished
        write_models_json(out_dirs[spec.group], spec.group, {spec.name: results[spec.group][spec.name]})
    return {g: entries for g, entries in results.items() if entries}


def write_models_json(out_dir: Path, group: str, entries: dict[str, dict]) -> Path:
    """Add or replace `entries` in `out_dir/models.json` (other models' entries are kept)."""
    jpath = out_dir / "models.json"
    doc = load_json(jpath)
    models = doc.get("models", {})
    models.update(entries)
    order = [s.name for s in SPECS if s.group == group]
    models = {k: models[k] for k in sorted(models, key=lambda k: (order.index(k) if k in order else len(order), k))}
    doc = {
        "generated_by": "tools/train_models.py",
        "note": "accuracies measured with onnxruntime on the exported files; eval files hold x "
                "preprocessed exactly as in training (see each model's preprocessing)",
        "eval_files": {f: f"{ds}: " + _subset_note(n, size)
                       for (g, ds), (f, n, size) in EVAL_SETS.items() if g == group},
        **({"calib_files": {f: f"{ds}: {n} samples of the train split drawn at random (Dataset.subset(n, seed={seed}))"
                            for ds, (f, n, seed) in BUDGET_CALIB.items()}} if group == "budget" else {}),
        "models": models,
    }
    jpath.write_text(json.dumps(doc, indent=2) + "\n")
    return jpath


DEFAULT_OUT = {
    "examples": REPO / "onnxmerge" / "examples",
    "tests": REPO / "tests" / "models",
    "bench": REPO / "build" / "bench_models",  # git-ignored, not shipped
    "mtz": REPO / "build" / "mtz_models",  # git-ignored, not shipped
    "zoo": REPO / "build" / "zoo_models",  # git-ignored, not shipped
    "budget": REPO / "build" / "budget_models",  # git-ignored, not shipped
}
BENCH_NAMES = [s.name for s in SPECS if s.group == "bench"]
MTZ_NAMES = [s.name for s in SPECS if s.group == "mtz"]
ZOO_NAMES = [s.name for s in SPECS if s.group == "zoo"]
BUDGET_NAMES = [s.name for s in SPECS if s.group == "budget"]


def ensure_models(group: str, names: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """The models `names` (default: all of them) of `group` in `out_dir` (default DEFAULT_OUT[group]):
    trains and exports only those whose .onnx file or models.json entry is missing (minutes each, see
    the group's specs), and writes any missing eval file, then returns {name: path of the .onnx}.
    The eval file of a model is `out_dir / models.json["models"][name]["eval_file"]`."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}: use one of {', '.join(GROUPS)}")
    by_name = {s.name: s for s in SPECS if s.group == group}
    names = list(by_name if names is None else names)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown {group} model(s) {', '.join(unknown)}: use {', '.join(by_name)}")
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT[group]
    have = load_json(out / "models.json").get("models", {})
    missing = [by_name[n] for n in names if not (out / f"{n}.onnx").is_file() or n not in have]
    if missing:
        with torch_settings():
            train_and_export(missing, {**DEFAULT_OUT, group: out})
    for ds in sorted({by_name[n].dataset for n in names}):  # eval files gone missing: no retraining
        if not (out / EVAL_SETS[group, ds][0]).is_file():
            write_eval_set(group, ds, out)
        if group == "budget" and not all((out / f[ds][0]).is_file() for f in (BUDGET_CALIB, BUDGET_VALIDATION)):
            write_budget_sets(ds, out)
    return {n: out / f"{n}.onnx" for n in names}


def ensure_bench_models(names: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """ensure_models("bench", names, out_dir): the NeuralMerger models (default build/bench_models/)."""
    return ensure_models("bench", names, out_dir)


def ensure_mtz_models(names: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """ensure_models("mtz", names, out_dir): the Multi-Task Zipping models (default build/mtz_models/)."""
    return ensure_models("mtz", names, out_dir)


def ensure_zoo_models(names: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """ensure_models("zoo", names, out_dir): the trained MobileNetV3-Small / EfficientNet-B0 models
    (default build/zoo_models/)."""
    return ensure_models("zoo", names, out_dir)


def ensure_budget_models(names: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """ensure_models("budget", names, out_dir): issue 18's acceptance-suite models (default
    build/budget_models/), with their test files (EVAL_SETS) and calibration files (BUDGET_CALIB)."""
    return ensure_models("budget", names, out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=sorted({s.name for s in SPECS}),
                    help="train only these models, of any group (others' entries in models.json are kept); "
                         "a name that two groups use (e.g. resnet_mnist: tests, mtz and budget) needs --group")
    ap.add_argument("--group", nargs="+", choices=GROUPS,
                    help=f"train these groups (default: {' and '.join(DEFAULT_GROUPS)}; with --only: "
                         "only the named models in these groups)")
    ap.add_argument("--out-examples", type=Path, default=DEFAULT_OUT["examples"])
    ap.add_argument("--out-tests", type=Path, default=DEFAULT_OUT["tests"])
    ap.add_argument("--out-bench", type=Path, default=DEFAULT_OUT["bench"])
    ap.add_argument("--out-mtz", type=Path, default=DEFAULT_OUT["mtz"])
    ap.add_argument("--out-zoo", type=Path, default=DEFAULT_OUT["zoo"])
    ap.add_argument("--out-budget", type=Path, default=DEFAULT_OUT["budget"])
    args = ap.parse_args(argv)

    groups = args.group or (GROUPS if args.only else DEFAULT_GROUPS)
    specs = [s for s in SPECS if s.group in groups and (not args.only or s.name in args.only)]
    if not specs:
        ap.error(f"none of {', '.join(args.only)} is in group(s) {', '.join(groups)}")
    if args.only and not args.group:  # a name in two groups: say which, rather than retrain both
        for name in args.only:
            in_groups = [s.group for s in specs if s.name == name]
            if len(in_groups) > 1:
                ap.error(f"{name} is a model of groups {' and '.join(in_groups)}: say which with --group")
    out_dirs = {"examples": args.out_examples, "tests": args.out_tests, "bench": args.out_bench,
                "mtz": args.out_mtz, "zoo": args.out_zoo, "budget": args.out_budget}
    t_start = time.time()
    with torch_settings():
        train_and_export(specs, out_dirs)
    print(f"total wall time {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
