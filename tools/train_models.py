#!/usr/bin/env python3
"""Train and export the project's real models (small CNNs on MNIST, Fashion-MNIST and FSDD).

    python tools/train_models.py [--only NAME ...] [--out-examples DIR] [--out-tests DIR]

Writes, deterministically (fixed seeds, 2 threads, CPU):

- `onnxmerge/examples/`: `fashion_lenet.onnx` (Fashion-MNIST, input (N,1,28,28)), `digits_lenet.onnx`
  (FSDD log-spectrograms, input (N,1,32,32)), `fashion_eval.npz` (first 1000 of the Fashion-MNIST test
  split), `digits_eval.npz` (all 300 FSDD test recordings), `models.json`;
- `tests/models/`: LeNet, VGG, MobileNet and ResNet-style models on MNIST / Fashion-MNIST (all input
  (N,1,28,28)), `mnist_eval.npz` and `fashion_eval.npz` (first 500 of each test split), `models.json`.

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
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

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


ARCHS = {
    "lenet": lambda size: LeNet(size),
    "vgg": lambda size: VGG(),
    "mobilenet": lambda size: MobileNet(),
    "resnet": lambda size: ResNet(),
}


# ----------------------------------------------------------------------------------------------
# what to train


@dataclass
class Spec:
    name: str  # file stem
    group: str  # "examples" or "tests"
    arch: str
    dataset: str  # load_named name
    epochs: int
    lr: float
    batch: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    notes: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return 32 if self.dataset == "fsdd" else 28


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
]

# the eval subsets: (group, dataset) -> (file name, how many of the test split; None = all)
EVAL_SETS = {
    ("examples", "fashion-mnist"): ("fashion_eval.npz", 1000),
    ("examples", "fsdd"): ("digits_eval.npz", None),
    ("tests", "mnist"): ("mnist_eval.npz", 500),
    ("tests", "fashion-mnist"): ("fashion_eval.npz", 500),
}


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


def export(model: nn.Module, size: int, path: Path) -> onnx.ModelProto:
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
    bad = ops - ALLOWED_OPS
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=[s.name for s in SPECS],
                    help="train only these models (others' entries in models.json are kept)")
    ap.add_argument("--out-examples", type=Path, default=REPO / "onnxmerge" / "examples")
    ap.add_argument("--out-tests", type=Path, default=REPO / "tests" / "models")
    args = ap.parse_args(argv)

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    out_dirs = {"examples": args.out_examples, "tests": args.out_tests}
    specs = [s for s in SPECS if not args.only or s.name in args.only]
    t_start = time.time()

    cache: dict[tuple[str, str], Dataset] = {}

    def data(name: str, split: str) -> Dataset:
        if (name, split) not in cache:
            cache[name, split] = load_named(name, split)
        return cache[name, split]

    # eval subsets of the groups and datasets being (re)trained
    evals: dict[tuple[str, str], Dataset] = {}
    for group, ds in sorted({(s.group, s.dataset) for s in specs}):
        fname, n = EVAL_SETS[group, ds]
        sub = load_named(ds, "test", limit=n)
        sub.preprocessing = {
            **sub.preprocessing,
            "subset": f"first {len(sub)} of the {ds} test split" if n is not None else f"all {len(sub)} of the {ds} test split",
        }
        out_dirs[group].mkdir(parents=True, exist_ok=True)
        save_npz(out_dirs[group] / fname, sub)
        evals[group, ds] = sub

    results: dict[str, dict[str, dict]] = {"examples": {}, "tests": {}}
    print(f"{'model':20} {'params':>8} {'epochs':>6} {'train s':>8} {'acc test':>9} {'acc eval':>9} {'ort diff':>9}")
    for spec in specs:
        t0 = time.time()
        set_seed(spec.seed)
        model = ARCHS[spec.arch](spec.size)
        train_ds = data(spec.dataset, "train")
        losses = train(model, train_ds, spec)
        t_train = time.time() - t0
        path = out_dirs[spec.group] / f"{spec.name}.onnx"
        export(model, spec.size, path)
        sess = ort_session(path)
        test = data(spec.dataset, "test")
        sub = evals[spec.group, spec.dataset]
        ort_sub = ort_logits(sess, sub.x)
        diff = float(np.abs(ort_sub - torch_logits(model, sub.x)).max())
        if diff > 1e-4:
            raise SystemExit(f"{path.name}: onnxruntime differs from torch by {diff:.3g} (> 1e-4)")
        acc_full = accuracy(ort_logits(sess, test.x), test.y)
        acc_sub = accuracy(ort_sub, sub.y)
        params = sum(p.numel() for p in model.parameters())
        fname = EVAL_SETS[spec.group, spec.dataset][0]
        results[spec.group][spec.name] = {
            "file": path.name,
            "task": spec.dataset,
            "architecture": spec.arch,
            "description": " ".join((type(model).__doc__ or "").split()),
            "input": {"name": "input", "shape": ["N", 1, spec.size, spec.size], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["N", 10], "dtype": "float32"},
            "params": params,
            "onnx_ops": sorted({n.op_type for n in onnx.load(str(path)).graph.node}),
            "training": {
                "split": "train", "samples": len(train_ds), "epochs": spec.epochs, "optimizer": "Adam",
                "lr": spec.lr, "schedule": "cosine to 0 over all steps", "weight_decay": spec.weight_decay,
                "batch": spec.batch, "seed": spec.seed, "threads": THREADS, "loss": "cross-entropy",
                "augmentation": "none", "final_epoch_loss": losses[-1], "torch": torch.__version__,
            },
            "accuracy": {"test_full": acc_full, "eval_subset": acc_sub, "test_samples": len(test), "eval_samples": len(sub)},
            "eval_file": fname,
            "ort_vs_torch_max_abs_diff_on_eval": float(f"{diff:.3g}"),
            "max_abs_logit_on_eval": round(float(np.abs(ort_sub).max()), 3),
            "preprocessing": train_ds.preprocessing,
        }
        print(f"{spec.name:20} {params:8d} {spec.epochs:6d} {t_train:8.1f} {acc_full:9.4f} {acc_sub:9.4f} {diff:9.2g}", flush=True)

    for group, entries in results.items():
        if not entries:
            continue
        jpath = out_dirs[group] / "models.json"
        doc = load_json(jpath)
        models = doc.get("models", {})
        models.update(entries)
        order = [s.name for s in SPECS]
        models = {k: models[k] for k in sorted(models, key=lambda k: (order.index(k) if k in order else len(order), k))}
        doc = {
            "generated_by": "tools/train_models.py",
            "note": "accuracies measured with onnxruntime on the exported files; eval files hold x "
                    "preprocessed exactly as in training (see each model's preprocessing)",
            "eval_files": {f: f"{ds}: " + (f"first {n} of the test split" if n else "all of the test split")
                           for (g, ds), (f, n) in EVAL_SETS.items() if g == group},
            "models": models,
        }
        jpath.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"total wall time {time.time() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
