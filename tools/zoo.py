#!/usr/bin/env python3
"""A zoo of small ONNX graphs of real-world CNN architectures, with random weights, for testing that
onnxmerge loads and merges any graph (not for accuracy: nothing here is trained).

    python tools/zoo.py --out tests/models/zoo            # regenerate every model and zoo.json
    python tools/zoo.py --out tests/models/zoo --only resnet18 alexnet_old
    python tools/zoo.py --out tests/models/zoo --check    # check the files (no writing); prints a table

Two styles, recorded per model in `zoo.json` ("style"):

- modern (`MODERN`): compact PyTorch re-implementations that follow torchvision's module structure (written
  here: torchvision is not a dependency), shrunk to a few blocks and narrow widths, input (batch, 3, 32, 32),
  10 classes, exported like tools/train_models.py: the TorchScript exporter (`dynamo=False`), opset 17,
  input "input", output "logits", dynamic batch dim "batch", eval mode with `TrainingMode.PRESERVE` so that
  BatchNormalization nodes are kept (their affine params are random and their running stats are measured on
  a random batch, then perturbed, so BN folding has real work to do);
- old (`OLD`): graphs written directly with `onnx.helper` the way 2017-2018 exporters wrote them: IR version
  3, opset 9, a fixed input shape (1, 3, 32, 32), every initializer also listed in `graph.input`, unnamed
  nodes, and the naming habits of the time (PyTorch 0.3's numbers, Caffe2's "conv1/7x7_s2_w_0", PyTorch
  1.0's state-dict names with numbered values).

Everything is deterministic (fixed seeds per model, 1 thread, CPU): a regeneration writes identical bytes,
which `--check` verifies too, along with onnx.checker, onnxruntime against torch (modern models: the torch
model, batch 2; old models: a node-by-node torch.nn.functional evaluation of the graph, batch 1; max abs
difference <= 1e-4 of the largest output), zoo.json, and file sizes (each < 500 KB, all < 3 MB).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "models" / "zoo"
OPSET = 17
OLD_OPSET = 9
OLD_IR = 3
NUM_CLASSES = 10
MAX_FILE = 500 * 1024
MAX_TOTAL = 3 * 1024 * 1024
STYLE_MODERN = "torch.onnx.export opset 17"
STYLE_OLD = "old exporter: IR 3, opset 9, fixed batch 1, initializers as inputs"


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    """torchvision's channel rounding (MobileNet, EfficientNet)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# ==============================================================================================
# A. modern architectures (torchvision's structure, shrunk)


# ---- ResNet (torchvision.models.resnet) ------------------------------------------------------

def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # ResNet v1.5: the stride sits on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision ResNet: conv7x7/2-BN-ReLU-maxpool3x3/2 stem, four stages of residual blocks (the first block
    of a stage strided, with a 1x1 conv+BN shortcut), adaptive avgpool, flatten, fc."""

    def __init__(self, block, layers: list[int], widths: list[int], stem: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18() -> nn.Module:
    """torchvision ResNet-18 layout (BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, residual Add, ReLU; [2, 2, 2, 2]
    blocks, widths 8-12-16-24): conv7x7/2-BN-ReLU-maxpool3x3/2 stem, strided first blocks with a 1x1 conv+BN
    shortcut, adaptive avgpool, flatten, fc."""
    return ResNet(BasicBlock, [2, 2, 2, 2], [8, 12, 16, 24], stem=8)


def resnet50() -> nn.Module:
    """torchvision ResNet-50 layout (Bottleneck 1x1-3x3-1x1 with expansion 4 and the stride on the 3x3;
    [3, 4, 6, 3] blocks, widths 4-8-12-16 expanded to 16-32-48-64): conv7x7/2-BN-ReLU-maxpool3x3/2 stem,
    1x1 conv+BN shortcuts, residual Add, adaptive avgpool, flatten, fc."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [4, 8, 12, 16], stem=8)


# ---- MobileNetV2 (torchvision.models.mobilenetv2) --------------------------------------------

class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: Conv (no bias) - BN - activation (None: no activation)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation_layer=nn.ReLU, eps: float = 1e-5, padding: int | None = None):
        if padding is None:
            padding = (kernel_size - 1) // 2
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False),
                  nn.BatchNorm2d(cout, eps=eps)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class InvertedResidualV2(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden, 1, activation_layer=nn.ReLU6))
        layers += [Conv2dNormActivation(hidden, hidden, 3, stride, groups=hidden, activation_layer=nn.ReLU6),
                   nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision MobileNetV2: ConvBNReLU6 stem, inverted residuals (1x1 expand - depthwise 3x3 - 1x1 linear
    project, residual Add when shapes allow; ReLU6 exports as Clip), 1x1 ConvBNReLU6, avgpool, Dropout, Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        setting = [[1, 8, 1, 1], [6, 12, 2, 2], [6, 16, 3, 2], [6, 24, 2, 2], [6, 32, 1, 1]]  # t, c, n, s
        inp, last = 8, 64
        features: list[nn.Module] = [Conv2dNormActivation(3, inp, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidualV2(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(Conv2dNormActivation(inp, last, 1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        return self.classifier(torch.flatten(x, 1))


# ---- MobileNetV3-Small (torchvision.models.mobilenetv3) --------------------------------------

class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool - 1x1 conv - activation - 1x1 conv - scale activation, times x."""

    def __init__(self, channels: int, squeeze: int, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, use_se: bool, act: str, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(Conv2dNormActivation(cin, exp, 1, activation_layer=activation, eps=0.001))
        layers.append(Conv2dNormActivation(exp, exp, k, stride, groups=exp, activation_layer=activation, eps=0.001))
        if use_se:
            layers.append(SqueezeExcitation(exp, _make_divisible(exp // 4, 8), scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(exp, cout, 1, activation_layer=None, eps=0.001))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        return result + x if self.use_res_connect else result


class MobileNetV3Small(nn.Module):
    """torchvision MobileNetV3-Small: Hardswish stem, inverted residuals with optional squeeze-excitation
    (Hardsigmoid scale) and ReLU or Hardswish, 1x1 conv, avgpool, Linear-Hardswish-Dropout-Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        cfg = [  # in, kernel, expanded, out, SE, activation, stride
            (8, 3, 8, 8, True, "RE", 2),
            (8, 3, 24, 12, False, "RE", 2),
            (12, 3, 32, 12, False, "RE", 1),
            (12, 5, 48, 16, True, "HS", 2),
            (16, 5, 64, 16, True, "HS", 1),
            (16, 5, 48, 24, True, "HS", 1),
        ]
        layers: list[nn.Module] = [Conv2dNormActivation(3, 8, 3, 2, activation_layer=nn.Hardswish, eps=0.001)]
        layers += [InvertedResidualV3(*c) for c in cfg]
        last_conv, last_channel = 4 * 24, 64
        layers.append(Conv2dNormActivation(24, last_conv, 1, activation_layer=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_conv, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=0.2, inplace=True), nn.Linear(last_channel, num_classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# ---- EfficientNet-B0 (torchvision.models.efficientnet) ---------------------------------------

class MBConv(nn.Module):
    def __init__(self, expand_ratio: int, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        expanded = _make_divisible(cin * expand_ratio, 8)
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                                           activation_layer=nn.SiLU))
        layers.append(SqueezeExcitation(expanded, max(1, cin // 4), activation=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        result = self.block(x)
        return result + x if self.use_res_connect else result  # stochastic depth: identity in eval


class EfficientNetB0(nn.Module):
    """torchvision EfficientNet-B0's seven MBConv stages (expand 1x1 - depthwise 3x3 or 5x5 - SE with SiLU and
    Sigmoid - project 1x1, SiLU activations, residual Add), shrunk; 1x1 head conv, avgpool, Dropout, Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        stages = [  # expand, kernel, stride, in, out, layers
            (1, 3, 1, 8, 8, 1), (4, 3, 2, 8, 12, 2), (4, 5, 2, 12, 16, 2), (4, 3, 2, 16, 20, 2),
            (4, 5, 1, 20, 24, 1), (4, 5, 2, 24, 32, 1), (4, 3, 1, 32, 40, 1),
        ]
        layers: list[nn.Module] = [Conv2dNormActivation(3, 8, 3, 2, activation_layer=nn.SiLU)]
        for e, k, s, cin, cout, n in stages:
            layers.append(nn.Sequential(*[MBConv(e, k, s if i == 0 else 1, cin if i == 0 else cout, cout)
                                          for i in range(n)]))
        layers.append(Conv2dNormActivation(40, 2 * 40, 1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(2 * 40, num_classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# ---- ShuffleNetV2 (torchvision.models.shufflenetv2) ------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    x = x.view(batchsize, -1, height, width)
    return x


class ShuffleUnit(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        bf = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else bf, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
            nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False), nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, 1, 1, 0, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """torchvision ShuffleNetV2: conv-BN-ReLU, maxpool, three stages of shuffle units (a strided unit with two
    branches, then units that chunk the channels in two and transform one half), channel shuffle via
    view/transpose/view on sizes read from x.size(), 1x1 conv5, global mean, fc."""

    def __init__(self, repeats=(2, 3, 2), channels=(8, 16, 32, 64, 128), num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inp = channels[0]
        for name, n, oup in zip(["stage2", "stage3", "stage4"], repeats, channels[1:4]):
            setattr(self, name, nn.Sequential(ShuffleUnit(inp, oup, 2), *[ShuffleUnit(oup, oup, 1)
                                                                          for _ in range(n - 1)]))
            inp = oup
        self.conv5 = nn.Sequential(nn.Conv2d(inp, channels[-1], 1, 1, 0, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        x = x.mean([2, 3])
        return self.fc(x)


# ---- SqueezeNet 1.1 (torchvision.models.squeezenet) ------------------------------------------

class Fire(nn.Module):
    def __init__(self, inplanes: int, squeeze: int, expand1x1: int, expand3x3: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                          self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    """torchvision SqueezeNet 1.1 at 1/8 width: conv3x3/2-ReLU, Fire modules (squeeze 1x1, expand 1x1 and 3x3,
    Concat) between MaxPool(3, 2, ceil_mode=True), classifier Dropout-conv1x1-ReLU-adaptive avgpool, flatten.
    The stem conv has padding 1 (torchvision: 0) so that every ceil_mode pool on a 32x32 input rounds up."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 4, 8, 8), Fire(16, 4, 8, 8),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(16, 8, 16, 16), Fire(32, 8, 16, 16),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(32, 12, 24, 24), Fire(48, 12, 24, 24), Fire(48, 16, 32, 32), Fire(64, 16, 32, 32))
        self.classifier = nn.Sequential(nn.Dropout(p=0.5), nn.Conv2d(64, num_classes, 1), nn.ReLU(inplace=True),
                                        nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


# ---- RegNetY (torchvision.models.regnet) -----------------------------------------------------

class ResBottleneckBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, group_width: int, se_ratio: float = 0.25):
        super().__init__()
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = Conv2dNormActivation(w_in, w_out, 1, stride, activation_layer=None)
        w_b = w_out  # bottleneck multiplier 1
        self.f = nn.Sequential()
        self.f.add_module("a", Conv2dNormActivation(w_in, w_b, 1))
        self.f.add_module("b", Conv2dNormActivation(w_b, w_b, 3, stride, groups=w_b // group_width))
        self.f.add_module("se", SqueezeExcitation(w_b, int(round(se_ratio * w_in))))
        self.f.add_module("c", Conv2dNormActivation(w_b, w_out, 1, activation_layer=None))
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.proj(x) + self.f(x) if self.proj is not None else x + self.f(x)
        return self.activation(x)


class RegNetY(nn.Module):
    """torchvision RegNetY: conv3x3/2 stem, stages of residual bottleneck blocks with grouped 3x3 convs
    (group width 8) and squeeze-excitation (ReLU, Sigmoid), 1x1 conv+BN projection, avgpool, fc."""

    def __init__(self, widths=(16, 24, 32, 48), depths=(1, 2, 3, 1), group_width: int = 8,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = Conv2dNormActivation(3, 16, 3, 2)
        blocks = []
        w_in = 16
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks.append((f"block{i + 1}", nn.Sequential(*[
                ResBottleneckBlock(w_in if j == 0 else w, w, 2 if j == 0 else 1, group_width) for j in range(d)])))
            w_in = w
        self.trunk_output = nn.Sequential()
        for name, b in blocks:
            self.trunk_output.add_module(name, b)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w_in, num_classes)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


# ---- VGG11 (torchvision.models.vgg) ----------------------------------------------------------

class VGG11(nn.Module):
    """torchvision VGG11 (configuration "A", no BN) at 1/8 width: conv3x3-ReLU and maxpool2 features,
    adaptive avgpool, classifier Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear. The avgpool is 1x1
    (torchvision: 7x7, which cannot be exported from a 1x1 map)."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        cfg = [8, "M", 16, "M", 24, 24, "M", 32, 32, "M", 32, 32, "M"]
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(64, num_classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


# ---- DenseNet (torchvision.models.densenet) --------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return self.conv2(self.relu2(self.norm2(bottleneck_output)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision DenseNet: conv7x7/2-BN-ReLU-maxpool stem, dense blocks whose layers (BN-ReLU-conv1x1-BN-ReLU-
    conv3x3) take the torch.cat of all earlier features, transitions (BN-ReLU-conv1x1-avgpool2), final BN,
    ReLU, adaptive avgpool, Linear. Growth 8, blocks (3, 3, 3), 16 initial features, bn_size 2."""

    def __init__(self, growth_rate: int = 8, block_config=(3, 3, 3), num_init_features: int = 16,
                 bn_size: int = 2, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, n, bn_size, growth_rate))
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.classifier = nn.Linear(n, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


# ---- GoogLeNet (torchvision.models.googlenet) ------------------------------------------------

class BasicConv2d(nn.Module):
    """torchvision's GoogLeNet / Inception v3 unit: conv (no bias) - BN(eps 0.001) - ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    def __init__(self, cin: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int, pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        # torchvision's "5x5" branch uses a 3x3 kernel (a known quirk kept for its pretrained weights)
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(cin, pool_proj, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    """torchvision GoogLeNet (no aux heads, no transform_input): conv7x7/2, ceil_mode maxpools, conv1x1, conv3x3,
    Inception modules (1x1; 1x1-3x3; 1x1-3x3; maxpool3x3/1 ceil_mode - 1x1; Concat), avgpool, Dropout, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = BasicConv2d(3, 16, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(16, 16, kernel_size=1)
        self.conv3 = BasicConv2d(16, 24, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(24, 8, 8, 12, 4, 4, 4)
        self.inception3b = Inception(28, 12, 12, 16, 4, 8, 8)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(44, 16, 8, 16, 4, 8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


# ---- Inception v3 (torchvision.models.inception) ---------------------------------------------

class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 8, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 6, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(6, 8, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 8, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(8, 12, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(12, 12, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))  # count_include_pad=True
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 16, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 8, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(8, 12, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(12, 12, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 12, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 12, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 12, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 12, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = m(bd)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 12, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(12, 20, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 12, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(12, 12, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(12, 12, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(12, 12, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 20, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 24, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(24, 12, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(24, 12, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 16, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(16, 16, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(16, 12, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(16, 12, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 12, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([b1, b3, bd, bp], 1)


class InceptionV3(nn.Module):
    """torchvision Inception v3, small: conv3x3/2 and conv3x3 stem, InceptionA x2 (5x5 and double 3x3 branches,
    avgpool3x3/1 branch with count_include_pad), InceptionB (reduction), InceptionC (1x7 / 7x1 factorised
    convs), InceptionD (reduction), InceptionE (1x3 and 3x1 split and concatenated), avgpool, Dropout, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 8, kernel_size=3, stride=2)
        self.Conv2d_2b_3x3 = BasicConv2d(8, 16, kernel_size=3, padding=1)
        self.Mixed_5b = InceptionA(16, pool_features=4)   # -> 32
        self.Mixed_5c = InceptionA(32, pool_features=8)   # -> 36
        self.Mixed_6a = InceptionB(36)                    # -> 64
        self.Mixed_6b = InceptionC(64, c7=8)              # -> 48
        self.Mixed_7a = InceptionD(48)                    # -> 80
        self.Mixed_7b = InceptionE(80)                    # -> 80
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(80, num_classes)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_1a_3x3(x))
        for m in (self.Mixed_5b, self.Mixed_5c, self.Mixed_6a, self.Mixed_6b, self.Mixed_7a, self.Mixed_7b):
            x = m(x)
        x = torch.flatten(self.dropout(self.avgpool(x)), 1)
        return self.fc(x)


# ---- ConvNeXt-ish (torchvision.models.convnext, LayerNorm replaced) --------------------------

class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float = 0.5):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x):
        y = self.norm(self.dwconv(x)).permute(0, 2, 3, 1)  # NCHW -> NHWC: the Linears act on channels
        y = self.pwconv2(self.act(self.pwconv1(y))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y  # stochastic depth: identity in eval


class ConvNeXtish(nn.Module):
    """torchvision ConvNeXt's layout without LayerNorm (BatchNorm2d instead): conv4x4/4 patchify stem, blocks of
    depthwise 7x7 conv, BN, permute to channels-last, Linear-GELU-Linear (exported as MatMul with constant
    weights), permute back, layer scale, residual Add; BN + conv2x2/2 downsampling; avgpool, flatten, Linear."""

    def __init__(self, dims=(16, 24, 32), depths=(2, 2, 1), num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), nn.BatchNorm2d(dims[0]))]
        for i, (d, n) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(d) for _ in range(n)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(nn.BatchNorm2d(d), nn.Conv2d(d, dims[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# ---- random weights ----------------------------------------------------------------------------

def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic random weights: He-normal convs, 1/sqrt(fan_in) Linears, random BN affine params,
    BN running stats measured on one random batch (so activations stay O(1)) and then perturbed; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, CNBlock):
                m.layer_scale.copy_(0.25 + 0.5 * torch.rand(m.layer_scale.shape, generator=g))
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
        model.train()
        model(torch.randn(16, 3, 32, 32, generator=g))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1 * m.running_var.sqrt())
            m.running_var.mul_(0.75 + 0.5 * torch.rand(m.running_var.shape, generator=g))
        # a residual branch's last BN scales small, as in trained ResNets (torchvision's zero_init_residual
        # in the limit): random gammas near 1 let 16 residual sums grow the activations and with them the
        # float rounding, past what any exact rewrite of the graph can keep under 1e-5
        for block in model.modules():
            last = block.bn2 if isinstance(block, BasicBlock) else block.bn3 if isinstance(block, Bottleneck) else None
            if last is not None:
                last.weight.mul_(0.25)
    return model.eval()


def export_modern(model: nn.Module) -> onnx.ModelProto:
    """Export like tools/train_models.py: TorchScript exporter, opset 17, "input" -> "logits", dynamic batch,
    TrainingMode.PRESERVE on a model in eval mode (keeps BatchNormalization nodes), constant folding."""
    model.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 3, 32, 32),), buf, dynamo=False, opset_version=OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        )
    m = onnx.load_from_string(buf.getvalue())
    m.producer_name = "onnxmerge tools/zoo.py"
    m.producer_version = f"torch {torch.__version__}"
    onnx.checker.check_model(m, full_check=True)
    return m


# ==============================================================================================
# B. old-style graphs (onnx.helper, IR 3, opset 9)


class OldGraph:
    """Builds a graph the way 2017-2018 exporters wrote it: unnamed nodes, no value_info, every initializer
    also a graph input. `naming`: "numeric" (PyTorch 0.3: input "0", initializers "1".."k" in creation order,
    then every node output numbered in node order), "caffe2" (names as given, "_0" on blobs read, "_1" on
    blobs written), "torch10" (PyTorch 1.0: initializers by state-dict name, input "input.1", values
    numbered) or "plain" (names as given)."""

    def __init__(self, name: str, seed: int, naming: str = "plain"):
        self.name, self.naming = name, naming
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.n = 0

    def tmp(self, hint: str = "t") -> str:
        self.n += 1
        return f"{hint}_{self.n}" if self.naming in ("plain", "caffe2") else f"%{self.n}"

    def init(self, name: str, arr: np.ndarray) -> str:
        assert name not in self.inits, name
        self.inits[name] = np.ascontiguousarray(arr)
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, n_out: int = 1, **attrs) -> str:
        outs = [out or self.tmp(op.lower())] + [self.tmp(op.lower()) for _ in range(n_out - 1)]
        self.nodes.append(helper.make_node(op, inputs, outs, **attrs))
        return outs[0]

    # -- layers --
    def he(self, shape, fan_in: int, gain: float = 2.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * (gain / fan_in) ** 0.5).astype(np.float32)

    def small(self, shape, scale: float = 0.1) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def conv(self, x: str, cin: int, cout: int, k, name: str, stride: int = 1, pad=0, bias: bool = True,
             group: int = 1, out: str | None = None) -> str:
        kh, kw = (k, k) if isinstance(k, int) else k
        ph, pw = (pad, pad) if isinstance(pad, int) else pad
        w = self.init(self.pname(name, "w"), self.he((cout, cin // group, kh, kw), cin // group * kh * kw))
        ins = [x, w]
        if bias:
            ins.append(self.init(self.pname(name, "b"), self.small((cout,))))
        return self.node("Conv", ins, out, dilations=[1, 1], group=group, kernel_shape=[kh, kw],
                         pads=[ph, pw, ph, pw], strides=[stride, stride])

    def bn(self, x: str, c: int, name: str, out: str | None = None) -> str:
        ins = [x,
               self.init(self.pname(name, "scale"), (0.5 + self.rng.random(c)).astype(np.float32)),
               self.init(self.pname(name, "bias"), self.small((c,), 0.2)),
               self.init(self.pname(name, "mean"), self.small((c,), 0.2)),
               self.init(self.pname(name, "var"), (0.5 + self.rng.random(c)).astype(np.float32))]
        return self.node("BatchNormalization", ins, out, epsilon=1e-5, momentum=0.9)

    def gemm(self, x: str, cin: int, cout: int, name: str, out: str | None = None) -> str:
        w = self.init(self.pname(name, "w"), self.he((cout, cin), cin, 1.0))
        b = self.init(self.pname(name, "b"), self.small((cout,)))
        return self.node("Gemm", [x, w, b], out, alpha=1.0, beta=1.0, transB=1)

    def relu(self, x: str, out: str | None = None) -> str:
        return self.node("Relu", [x], out)

    def maxpool(self, x: str, k: int, s: int, pads=(0, 0, 0, 0), out: str | None = None) -> str:
        return self.node("MaxPool", [x], out, kernel_shape=[k, k], pads=list(pads), strides=[s, s])

    def avgpool(self, x: str, k: int, s: int, pads=(0, 0, 0, 0), include_pad: int = 0,
                out: str | None = None) -> str:
        return self.node("AveragePool", [x], out, kernel_shape=[k, k], pads=list(pads), strides=[s, s],
                         count_include_pad=include_pad)

    def lrn(self, x: str, out: str | None = None) -> str:
        return self.node("LRN", [x], out, size=5, alpha=1e-4, beta=0.75, bias=1.0)

    def pname(self, layer: str, kind: str) -> str:
        if self.naming == "caffe2":
            return f"{layer}_{kind}_0"
        if self.naming == "torch10":
            return f"{layer}." + {"w": "weight", "b": "bias", "scale": "weight", "bias": "bias",
                                  "mean": "running_mean", "var": "running_var"}[kind]
        return f"{layer}.{kind}"

    # -- model --
    def finish(self, x: str, y: str, out_shape=(1, NUM_CLASSES)) -> onnx.ModelProto:
        nodes, inits, x_name, y_name = self.nodes, self.inits, x, y
        if self.naming in ("numeric", "torch10"):
            ren: dict[str, str] = {}
            k = 0
            if self.naming == "numeric":
                ren[x] = "0"
                for name in inits:
                    k += 1
                    ren[name] = str(k)
            else:
                ren[x] = "input.1"
                k = 1
            for nd in nodes:
                for o in nd.output:
                    k += 1
                    ren[o] = str(k)
            for nd in nodes:
                nd.input[:] = [ren.get(i, i) for i in nd.input]
                nd.output[:] = [ren.get(o, o) for o in nd.output]
            inits = {ren.get(n, n): a for n, a in inits.items()}
            x_name, y_name = ren[x], ren[y]
        inputs = [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, [1, 3, 32, 32])]
        inputs += [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                   for n, a in inits.items()]
        graph = helper.make_graph(
            nodes, self.name, inputs,
            [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, list(out_shape))],
            initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OLD_OPSET)],
                              producer_name="onnxmerge tools/zoo.py (old-style)", producer_version="1")
        m.ir_version = OLD_IR
        onnx.checker.check_model(m, full_check=True)
        return m


def alexnet_old(seed: int) -> onnx.ModelProto:
    """AlexNet as PyTorch 0.3 exported it (numbered names): Conv(+bias)-Relu-LRN-MaxPool twice, three
    Conv-Relu, MaxPool, Reshape to a constant [1, -1], Gemm(transB=1)-Relu-Dropout(ratio) twice (the first
    Dropout with its mask output), Gemm, Softmax."""
    g = OldGraph("torch-jit-export", seed, "numeric")
    x = g.tmp()
    h = g.maxpool(g.lrn(g.relu(g.conv(x, 3, 16, 5, "features.0", pad=2))), 3, 2)        # 15
    h = g.maxpool(g.lrn(g.relu(g.conv(h, 16, 24, 5, "features.4", pad=2))), 3, 2)       # 7
    h = g.relu(g.conv(h, 24, 24, 3, "features.8", pad=1))
    h = g.relu(g.conv(h, 24, 24, 3, "features.10", pad=1))
    h = g.relu(g.conv(h, 24, 24, 3, "features.12", pad=1))
    h = g.maxpool(h, 3, 2)                                                                 # 3
    h = g.node("Reshape", [h, g.init("shape", np.array([1, -1], np.int64))])
    h = g.node("Dropout", [g.relu(g.gemm(h, 24 * 3 * 3, 48, "classifier.1"))], n_out=2, ratio=0.5)
    h = g.node("Dropout", [g.relu(g.gemm(h, 48, 48, "classifier.4"))], ratio=0.5)
    h = g.node("Softmax", [g.gemm(h, 48, NUM_CLASSES, "classifier.6")], axis=1)
    return g.finish(x, h)


def resnet_old(seed: int) -> onnx.ModelProto:
    """A CIFAR ResNet as PyTorch 0.3 exported it (numbered names): Conv (no bias) - BatchNormalization (opset 9:
    five inputs, epsilon, momentum) - Relu, basic blocks whose residual addition is a two-input Sum (strided
    ones with a 1x1 conv+BN shortcut), GlobalAveragePool, Flatten, Gemm."""
    g = OldGraph("torch-jit-export", seed, "numeric")
    x = g.tmp()
    h = g.relu(g.bn(g.conv(x, 3, 16, 3, "conv1", pad=1, bias=False), 16, "bn1"))

    def block(h: str, cin: int, cout: int, stride: int, name: str) -> str:
        y = g.relu(g.bn(g.conv(h, cin, cout, 3, f"{name}.conv1", stride, 1, bias=False), cout, f"{name}.bn1"))
        y = g.bn(g.conv(y, cout, cout, 3, f"{name}.conv2", 1, 1, bias=False), cout, f"{name}.bn2")
        if stride != 1 or cin != cout:
            h = g.bn(g.conv(h, cin, cout, 1, f"{name}.shortcut.0", stride, bias=False), cout, f"{name}.shortcut.1")
        return g.relu(g.node("Sum", [y, h]))

    h = block(h, 16, 16, 1, "layer1.0")
    h = block(h, 16, 24, 2, "layer2.0")
    h = block(h, 24, 32, 2, "layer3.0")
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    return g.finish(x, g.gemm(h, 32, NUM_CLASSES, "fc"))


def inception_old(seed: int) -> onnx.ModelProto:
    """GoogLeNet v1 as the Caffe2 converter wrote it (blob names "conv1/7x7_s2_1", weights "..._w_0"): Conv-Relu,
    MaxPool with Caffe's asymmetric ceil padding, LRN, Inception modules (1x1; 1x1-3x3; 1x1-5x5; maxpool3x3/1
    - 1x1) joined by Concat, an NCHW->NHWC->NCHW Transpose pair around nothing, AveragePool, flatten as
    Transpose + Reshape, Dropout, Gemm, Unsqueeze/Squeeze (opset 9 `axes` attributes), Softmax."""
    g = OldGraph("googlenet", seed, "caffe2")
    x = "data_0"
    h = g.relu(g.conv(x, 3, 16, 7, "conv1/7x7_s2", 2, 3, out="conv1/7x7_s2_1"), "conv1/7x7_s2_2")
    h = g.maxpool(h, 3, 2, (0, 0, 1, 1), out="pool1/3x3_s2_1")                           # 16 -> 8
    h = g.lrn(h, "pool1/norm1_1")
    h = g.relu(g.conv(h, 16, 16, 1, "conv2/3x3_reduce", out="conv2/3x3_reduce_1"), "conv2/3x3_reduce_2")
    h = g.relu(g.conv(h, 16, 32, 3, "conv2/3x3", pad=1, out="conv2/3x3_1"), "conv2/3x3_2")
    h = g.lrn(h, "conv2/norm2_1")
    h = g.maxpool(h, 3, 2, (0, 0, 1, 1), out="pool2/3x3_s2_1")                           # 8 -> 4

    def inception(h: str, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int, name: str) -> str:
        def cr(h, cin, cout, k, part):
            c = g.conv(h, cin, cout, k, f"{name}/{part}", pad=k // 2, out=f"{name}/{part}_1")
            return g.relu(c, f"{name}/{part}_2")
        b1 = cr(h, cin, c1, 1, "1x1")
        b3 = cr(cr(h, cin, c3r, 1, "3x3_reduce"), c3r, c3, 3, "3x3")
        b5 = cr(cr(h, cin, c5r, 1, "5x5_reduce"), c5r, c5, 5, "5x5")
        bp = cr(g.maxpool(h, 3, 1, (1, 1, 1, 1), out=f"{name}/pool_1"), cin, cp, 1, "pool_proj")
        return g.node("Concat", [b1, b3, b5, bp], f"{name}/output_1", axis=1)

    h = inception(h, 32, 8, 8, 12, 4, 4, 4, "inception_3a")                                 # 28
    h = g.node("Transpose", [h], "inception_3a/output_nhwc_1", perm=[0, 2, 3, 1])
    h = g.node("Transpose", [h], "inception_3a/output_nchw_1", perm=[0, 3, 1, 2])
    h = inception(h, 28, 8, 12, 16, 4, 8, 8, "inception_3b")                                # 40
    h = g.avgpool(h, 2, 2, out="pool5/2x2_s2_1")                                           # 4 -> 2
    h = g.node("Transpose", [h], "pool5/2x2_s2_nhwc_1", perm=[0, 2, 3, 1])
    h = g.node("Reshape", [h, g.init("OC2_DUMMY_0", np.array([1, 2 * 2 * 40], np.int64))], "pool5/flat_1")
    h = g.node("Dropout", [h], "pool5/drop_7x7_s1_1", ratio=0.4)
    h = g.gemm(h, 2 * 2 * 40, NUM_CLASSES, "loss3/classifier", out="loss3/classifier_1")
    h = g.node("Unsqueeze", [h], "loss3/classifier_4d_1", axes=[2, 3])
    h = g.node("Squeeze", [h], "loss3/classifier_2d_1", axes=[2, 3])
    return g.finish(x, g.node("Softmax", [h], "prob_1", axis=1))


def const_subgraph_old(seed: int) -> onnx.ModelProto:
    """Weights computed by constant subgraphs, as some converters left them: the first conv's weight is a flat
    Constant reshaped by another Constant's shape, its bias a Mul of two Constants; three branches (1x1 conv,
    3x3 conv, identity) added by one three-input Sum; the Gemm weight is Transpose(initializer)."""
    g = OldGraph("const_subgraph", seed, "plain")
    x = "input"
    w = g.he((8 * 3 * 3 * 3,), 27)
    w_flat = g.node("Constant", [], "conv1_w_flat", value=numpy_helper.from_array(w, "w_flat"))
    w_shape = g.node("Constant", [], "conv1_w_shape",
                     value=numpy_helper.from_array(np.array([8, 3, 3, 3], np.int64), "w_shape"))
    w4 = g.node("Reshape", [w_flat, w_shape], "conv1_w")
    b_raw = g.node("Constant", [], "conv1_b_raw", value=numpy_helper.from_array(g.small((8,), 1.0), "b_raw"))
    b_scale = g.node("Constant", [], "conv1_b_scale",
                     value=numpy_helper.from_array(g.small((8,), 0.1), "b_scale"))
    b = g.node("Mul", [b_raw, b_scale], "conv1_b")
    h = g.node("Conv", [x, w4, b], "conv1", dilations=[1, 1], group=1, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
               strides=[1, 1])
    h = g.maxpool(g.relu(h, "relu1"), 2, 2, out="pool1")                                   # 16
    a = g.conv(h, 8, 8, 1, "branch_a", out="branch_a")
    c = g.conv(h, 8, 8, 3, "branch_b", pad=1, out="branch_b")
    h = g.relu(g.node("Sum", [a, c, h], "sum3"), "relu2")
    h = g.maxpool(h, 2, 2, out="pool2")                                                    # 8
    h = g.relu(g.conv(h, 8, 16, 3, "conv3", pad=1, out="conv3"), "relu3")
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h], "gap")], "flat", axis=1)
    wt = g.init("fc_w_t", g.he((16, NUM_CLASSES), 16, 1.0))       # stored (in, out): transposed in the graph
    fc_w = g.node("Transpose", [wt], "fc_w", perm=[1, 0])
    fc_b = g.init("fc_b", g.small((NUM_CLASSES,)))
    return g.finish(x, g.node("Gemm", [h, fc_w, fc_b], "logits", alpha=1.0, beta=1.0, transB=1))


def densenet_old(seed: int) -> onnx.ModelProto:
    """A small DenseNet as PyTorch 1.0 exported it to opset 9 without constant folding (initializers by
    state-dict name, input "input.1", values numbered): conv stem, dense layers BN-Relu-Conv1x1-BN-Relu-
    Conv3x3 each concatenated onto all earlier features, transition BN-Relu-Conv1x1-AveragePool2,
    final BN-Relu, GlobalAveragePool, Flatten, Gemm."""
    g = OldGraph("torch-jit-export", seed, "torch10")
    x = g.tmp()
    h = g.conv(x, 3, 16, 3, "features.conv0", stride=2, pad=1, bias=False)                 # 16
    c = 16
    growth = 8
    for b in (1, 2):
        feats = [h]
        for i in range(1, 4):
            p = f"features.denseblock{b}.denselayer{i}"
            cat = feats[0] if len(feats) == 1 else g.node("Concat", feats, axis=1)
            y = g.conv(g.relu(g.bn(cat, c, f"{p}.norm1")), c, 2 * growth, 1, f"{p}.conv1", bias=False)
            y = g.conv(g.relu(g.bn(y, 2 * growth, f"{p}.norm2")), 2 * growth, growth, 3, f"{p}.conv2", pad=1,
                       bias=False)
            feats.append(y)
            c += growth
        h = g.node("Concat", feats, axis=1)
        if b == 1:
            p = "features.transition1"
            h = g.conv(g.relu(g.bn(h, c, f"{p}.norm")), c, c // 2, 1, f"{p}.conv", bias=False)
            c //= 2
            h = g.avgpool(h, 2, 2)                                                          # 8
    h = g.relu(g.bn(h, c, "features.norm5"))
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h])], axis=1)
    return g.finish(x, g.gemm(h, c, NUM_CLASSES, "classifier"))


# ==============================================================================================
# registry, manifest, checks


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    style: str
    seed: int
    build: Callable  # modern: () -> nn.Module; old: (seed) -> onnx.ModelProto

    @property
    def modern(self) -> bool:
        return self.style == STYLE_MODERN


ZOO = [
    Entry("resnet18", "resnet", STYLE_MODERN, 101, resnet18),
    Entry("resnet50", "resnet", STYLE_MODERN, 102, resnet50),
    Entry("mobilenet_v2", "mobilenet", STYLE_MODERN, 103, MobileNetV2),
    Entry("mobilenet_v3_small", "mobilenet", STYLE_MODERN, 104, MobileNetV3Small),
    Entry("efficientnet_b0", "efficientnet", STYLE_MODERN, 105, EfficientNetB0),
    Entry("shufflenet_v2", "shufflenet", STYLE_MODERN, 106, ShuffleNetV2),
    Entry("squeezenet1_1", "squeezenet", STYLE_MODERN, 107, SqueezeNet11),
    Entry("regnet_y", "regnet", STYLE_MODERN, 108, RegNetY),
    Entry("vgg11", "vgg", STYLE_MODERN, 109, VGG11),
    Entry("densenet", "densenet", STYLE_MODERN, 110, DenseNet),
    Entry("googlenet", "inception", STYLE_MODERN, 111, GoogLeNet),
    Entry("inception_v3", "inception", STYLE_MODERN, 112, InceptionV3),
    Entry("convnext_gelu", "convnext", STYLE_MODERN, 113, ConvNeXtish),
    Entry("alexnet_old", "alexnet", STYLE_OLD, 201, alexnet_old),
    Entry("resnet_old", "resnet", STYLE_OLD, 202, resnet_old),
    Entry("inception_old", "inception", STYLE_OLD, 203, inception_old),
    Entry("const_subgraph_old", "const-subgraph", STYLE_OLD, 204, const_subgraph_old),
    Entry("densenet_old", "densenet", STYLE_OLD, 205, densenet_old),
]
BY_NAME = {e.name: e for e in ZOO}


def torch_model(e: Entry) -> nn.Module:
    torch.manual_seed(e.seed)
    return randomize(e.build(), e.seed)


def build(e: Entry) -> tuple[onnx.ModelProto, nn.Module | None]:
    """The entry's ONNX model (and, for modern ones, the torch model it was exported from)."""
    if e.modern:
        model = torch_model(e)
        return export_modern(model), model
    return e.build(e.seed), None


def describe(e: Entry, m: onnx.ModelProto, data: bytes, model: nn.Module | None) -> dict:
    """The entry's zoo.json record."""
    doc = e.build.__doc__
    inits = {i.name for i in m.graph.initializer}
    x = next(i for i in m.graph.input if i.name not in inits)
    y = m.graph.output[0]

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "file": f"{e.name}.onnx",
        "family": e.family,
        "style": e.style,
        "description": " ".join((doc or "").split()),
        "input": {"name": x.name, "shape": dims(x), "dtype": "float32"},
        "output": {"name": y.name, "shape": dims(y), "dtype": "float32"},
        "ir_version": m.ir_version,
        "opset": m.opset_import[0].version,
        "seed": e.seed,
        "params": int(sum(np.prod(i.dims) for i in m.graph.initializer)),
        "nodes": len(m.graph.node),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "ops": sorted({n.op_type for n in m.graph.node}),
    }


def write(out: Path, names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "zoo.json"
    doc = json.loads(jpath.read_text()) if jpath.is_file() else {}
    models = doc.get("models", {})
    for name in names:
        e = BY_NAME[name]
        m, model = build(e)
        data = m.SerializeToString()
        (out / f"{name}.onnx").write_bytes(data)
        models[name] = describe(e, m, data, model)
        print(f"wrote {name}.onnx ({len(data) / 1024:.0f} KiB, {len(m.graph.node)} nodes)", flush=True)
    order = [e.name for e in ZOO]
    doc = {
        "generated_by": "tools/zoo.py",
        "regenerate": "python tools/zoo.py --out tests/models/zoo",
        "check": "python tools/zoo.py --out tests/models/zoo --check",
        "note": "random weights (fixed seeds), not trained: for testing that graphs load and merge, not for "
                "accuracy. Modern models: input (batch, 3, 32, 32) NCHW float32, output (batch, 10). Old models: "
                "fixed (1, 3, 32, 32) -> (1, 10), IR 3, opset 9, initializers listed as graph inputs.",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "models": {k: models[k] for k in sorted(models, key=lambda k: order.index(k) if k in order else len(order))},
    }
    jpath.write_text(json.dumps(doc, indent=2) + "\n")


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def torch_reference(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """Run an old-style graph with torch.nn.functional, node by node: an independent reference for onnxruntime.
    (onnx.reference is no use here: in onnx 1.23 its LRN sums squares over the wrong axis and its
    BatchNormalization-9 mixes in the batch statistics whenever the `momentum` attribute is set.)"""
    env = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in m.graph.initializer}
    env[m.graph.input[0].name] = torch.from_numpy(x)
    for nd in m.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in nd.attribute}
        ins = [env[i] for i in nd.input]
        op = nd.op_type
        if op == "Conv":
            p = a.get("pads", [0, 0, 0, 0])
            assert p[:2] == p[2:]
            y = F.conv2d(ins[0], ins[1], ins[2] if len(ins) > 2 else None, a.get("strides", 1), p[:2],
                         groups=a.get("group", 1))
        elif op in ("MaxPool", "AveragePool"):
            p = a.get("pads", [0, 0, 0, 0])
            fill = float("-inf") if op == "MaxPool" else 0.0
            h = F.pad(ins[0], (p[1], p[3], p[0], p[2]), value=fill)
            if op == "MaxPool":
                y = F.max_pool2d(h, a["kernel_shape"], a["strides"])
            else:
                assert a.get("count_include_pad", 0) or not any(p)
                y = F.avg_pool2d(h, a["kernel_shape"], a["strides"])
        elif op == "BatchNormalization":
            y = F.batch_norm(ins[0], ins[3], ins[4], ins[1], ins[2], False, 0.0, a.get("epsilon", 1e-5))
        elif op == "LRN":
            y = F.local_response_norm(ins[0], a["size"], a["alpha"], a["beta"], a.get("bias", 1.0))
        elif op == "Gemm":
            b = ins[1].t() if a.get("transB", 0) else ins[1]
            y = a.get("alpha", 1.0) * ins[0] @ b + a.get("beta", 1.0) * ins[2]
        elif op == "Reshape":
            y = ins[0].reshape(ins[1].tolist())
        elif op == "Constant":
            y = torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
        elif op in ("Sum", "Mul"):
            y = ins[0]
            for t in ins[1:]:
                y = y + t if op == "Sum" else y * t
        else:
            y = {
                "Relu": lambda: F.relu(ins[0]),
                "Dropout": lambda: ins[0],
                "Softmax": lambda: F.softmax(ins[0], a.get("axis", 1)),
                "GlobalAveragePool": lambda: ins[0].mean((2, 3), keepdim=True),
                "Flatten": lambda: ins[0].flatten(a.get("axis", 1)),
                "Concat": lambda: torch.cat(ins, a["axis"]),
                "Transpose": lambda: ins[0].permute(a["perm"]),
                "Unsqueeze": lambda: ins[0].reshape([*ins[0].shape[:a["axes"][0]], *[1] * len(a["axes"]),
                                                     *ins[0].shape[a["axes"][0]:]]),
                "Squeeze": lambda: ins[0].squeeze(tuple(a["axes"])),
            }[op]()
        env[nd.output[0]] = y
    return env[m.graph.output[0].name].numpy()


def check(out: Path, names: list[str]) -> bool:
    doc = json.loads((out / "zoo.json").read_text())
    ok, total = True, 0
    print(f"{'name':20} {'KiB':>5} {'nodes':>5} {'params':>7} {'err':>8} {'|y|max':>7}  ops")
    for name in names:
        e = BY_NAME[name]
        path = out / f"{name}.onnx"
        data = path.read_bytes()
        total += len(data)
        problems = []
        m = onnx.load_from_string(data)
        try:
            onnx.checker.check_model(m, full_check=True)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"checker: {exc}")
        fresh, model = build(e)
        if fresh.SerializeToString() != data:
            problems.append("differs from a fresh build (regenerate)")
        entry = doc["models"].get(name)
        if entry != describe(e, m, data, model):
            problems.append("zoo.json entry out of date")
        if model is not None:
            n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in model.modules())
            if n_bn != sum(n.op_type == "BatchNormalization" for n in m.graph.node):
                problems.append(f"{n_bn} BatchNorm2d in torch but not as many BatchNormalization nodes")
        if len(data) >= MAX_FILE:
            problems.append(f"file {len(data)} bytes >= {MAX_FILE}")
        rng = np.random.default_rng(e.seed)
        x = rng.standard_normal((2 if e.modern else 1, 3, 32, 32)).astype(np.float32)
        y = ort_run(path, x)
        if e.modern:
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
        else:
            with torch.no_grad():
                ref = torch_reference(m, x)
        scale = float(np.abs(ref).max())
        err = float(np.abs(y - ref).max()) / max(scale, 1e-12)
        if y.shape != (x.shape[0], NUM_CLASSES) or not np.isfinite(y).all() or err > 1e-4:
            problems.append(f"output {y.shape}, relative error {err:.2g}")
        ops = sorted({n.op_type for n in m.graph.node})
        print(f"{name:20} {len(data) / 1024:5.0f} {len(m.graph.node):5d} {entry['params'] if entry else 0:7d} "
              f"{err:8.1e} {scale:7.3g}  {' '.join(ops)}", flush=True)
        for p in problems:
            print(f"    PROBLEM {name}: {p}")
        ok &= not problems
    print(f"total {total / 1024:.0f} KiB over {len(names)} files")
    if len(names) == len(ZOO) and total >= MAX_TOTAL:
        print(f"PROBLEM: total {total} bytes >= {MAX_TOTAL}")
        ok = False
    print("all checks passed" if ok else "CHECKS FAILED")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default tests/models/zoo)")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=list(BY_NAME), help="only these models")
    ap.add_argument("--check", action="store_true", help="check the files in --out instead of writing them")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.only or [e.name for e in ZOO]
    if args.check:
        return 0 if check(args.out, names) else 1
    write(args.out, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
