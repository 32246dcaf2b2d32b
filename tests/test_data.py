"""onnxmerge.data: npz / IDX / WAV loading, preprocessing records, checks and errors."""

from __future__ import annotations

import gzip
import json
import struct
import wave
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from onnxmerge import data as D
from onnxmerge.data import Dataset, SpectrogramConfig, check_fits, load_dataset, parse_task_paths, save_npz
from onnxmerge.errors import MergeError, UsageError

EXAMPLES = Path(D.__file__).resolve().parent / "examples"
SKIP_REAL = "../shared/data not found: real-dataset test skipped"


# ----------------------------------------------------------------------------------------------
# helpers that write tiny datasets


def write_idx(path: Path, arr: np.ndarray) -> None:
    arr = np.asarray(arr, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_wav(path: Path, signal: np.ndarray, rate: int = 8000, width: int = 2, channels: int = 1) -> None:
    s = np.clip(signal, -1, 1 - 1e-9)
    if width == 2:
        v = (s * 32767).astype("<i2")
    elif width == 1:
        v = np.round(s * 127 + 128).astype(np.uint8)
    else:
        raise ValueError(width)
    if channels > 1:
        v = np.repeat(v[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(v.tobytes())


def sine(freq: float, seconds: float = 0.5, rate: int = 8000, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "idx"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 4, 5)))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(6) % 10)
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 4, 5)))  # plain, not gzipped
    write_idx(d / "t10k-labels-idx1-ubyte", np.array([7, 2, 1]))
    return d


FREQS = {3: 440.0, 7: 1500.0}  # digit -> sine frequency


@pytest.fixture
def wav_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fsdd" / "recordings"
    d.mkdir(parents=True)
    for digit, f in FREQS.items():
        for take in range(7):  # takes 0-4 test, 5-6 train
            write_wav(d / f"{digit}_spk_{take}.wav", sine(f, 0.3 + 0.05 * take))
    return tmp_path / "fsdd"


# ----------------------------------------------------------------------------------------------
# npz


def test_npz_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(1).random((5, 1, 3, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4])
    prep = {"format": "custom", "scaling": "x/255", "size": [3, 3]}
    p = save_npz(tmp_path / "d.npz", Dataset(x, y, "mem", prep))
    ds = load_dataset(p)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    np.testing.assert_array_equal(ds.x, x)
    np.testing.assert_array_equal(ds.y, y)
    assert ds.preprocessing == prep and ds.source == str(p) and len(ds) == 5
    assert len(load_dataset(p, limit=2)) == 2
    # the same content gives the same bytes
    b1 = p.read_bytes()
    save_npz(p, Dataset(x, y, "mem", prep))
    assert p.read_bytes() == b1


def test_npz_plain_arrays(tmp_path: Path) -> None:
    p = tmp_path / "plain.npz"
    np.savez(p, x=np.ones((4, 2), dtype=np.float64), y=np.array([1.0, 0.0, 1.0, 0.0]))
    ds = load_dataset(p)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.preprocessing == {"format": "npz"}
    np.savez(p, x=np.ones((3, 2)))
    assert load_dataset(p).y is None


def test_dataset_subset_and_take() -> None:
    ds = Dataset(np.arange(10, dtype=np.float32)[:, None], np.arange(10), "mem", {})
    a, b = ds.subset(4, seed=3), ds.subset(4, seed=3)
    np.testing.assert_array_equal(a.y, b.y)
    assert len(a) == 4 and np.all(np.diff(a.y) > 0)
    np.testing.assert_array_equal(a.x[:, 0], a.y)
    assert len(ds.subset(50)) == 10 and list(ds.take(3).y) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# IDX


def test_idx_folder(idx_dir: Path) -> None:
    test = load_dataset(idx_dir)  # split="test" -> t10k, plain files
    assert test.x.shape == (3, 1, 4, 5) and test.x.dtype == np.float32
    assert list(test.y) == [7, 2, 1] and test.y.dtype == np.int64
    raw = D._read_idx(idx_dir / "t10k-images-idx3-ubyte", 3)
    np.testing.assert_array_equal(test.x[:, 0], raw.astype(np.float32) / 255)
    assert 0.0 <= test.x.min() and test.x.max() <= 1.0
    assert test.preprocessing["format"] == "idx" and test.preprocessing["split"] == "test"
    json.dumps(test.preprocessing)

    train = load_dataset(idx_dir, split="train")  # gzipped files
    assert train.x.shape == (6, 1, 4, 5) and list(train.y) == [0, 1, 2, 3, 4, 5]
    assert len(load_dataset(idx_dir, split="all")) == 9
    assert len(load_dataset(idx_dir, split="train", limit=2)) == 2


def test_idx_without_labels(idx_dir: Path) -> None:
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    assert load_dataset(idx_dir).y is None


@pytest.mark.parametrize("damage", ["truncate", "magic", "count"])
def test_idx_corrupt(idx_dir: Path, damage: str) -> None:
    f = idx_dir / "t10k-images-idx3-ubyte"
    b = bytearray(f.read_bytes())
    if damage == "truncate":
        b = b[:-7]
    elif damage == "magic":
        b[0] = 0x12
    else:
        write_idx(idx_dir / "t10k-labels-idx1-ubyte", np.array([1, 2]))
    f.write_bytes(bytes(b))
    with pytest.raises(MergeError, match="t10k-"):
        load_dataset(idx_dir)


def test_idx_bad_gzip(idx_dir: Path) -> None:
    (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(MergeError, match="train-images-idx3-ubyte.gz"):
        load_dataset(idx_dir, split="train")


# ----------------------------------------------------------------------------------------------
# WAV


def test_wav_folder(wav_dir: Path) -> None:
    test = load_dataset(wav_dir)  # finds recordings/, split="test" -> takes 0-4
    assert test.x.shape == (10, 1, 32, 32) and test.x.dtype == np.float32
    assert list(test.y) == [3] * 5 + [7] * 5
    assert test.source.endswith("recordings")
    assert 0.0 <= test.x.min() and test.x.max() == 1.0
    train = load_dataset(wav_dir, split="train")
    assert list(train.y) == [3, 3, 7, 7]
    assert len(load_dataset(wav_dir, split="all")) == 14

    prep = test.preprocessing
    json.dumps(prep)
    assert prep["format"] == "wav-log-spectrogram" and prep["split"] == "test"
    for k, v in asdict(SpectrogramConfig()).items():
        assert prep["spectrogram"][k] == v

    # deterministic
    np.testing.assert_array_equal(load_dataset(wav_dir).x, test.x)
    # different frequencies give different images, with the energy in the right frequency rows:
    # 440 Hz is bin 14 of 128 (row 3 of 32), 1500 Hz bin 48 (row 12)
    a, b = test.x[0, 0], test.x[5, 0]
    assert np.abs(a - b).max() > 0.5
    assert int(a.mean(axis=1).argmax()) == 3
    assert int(b.mean(axis=1).argmax()) == 12
    # the recordings are 0.3-0.5 s: columns past the end are empty (zero padding)
    assert np.all(test.x[0, 0, :, 25:] == 0)


def test_wav_config_and_formats(wav_dir: Path, tmp_path: Path) -> None:
    cfg = SpectrogramConfig(height=16, width=8)
    ds = load_dataset(wav_dir, spectrogram=cfg, limit=3)
    assert ds.x.shape == (3, 1, 16, 8) and ds.preprocessing["spectrogram"]["height"] == 16
    ref = D.wav_to_image(wav_dir / "recordings" / "3_spk_0.wav")
    # 8-bit, stereo and a 16 kHz file of the same tone give (nearly) the same image
    sig = sine(440.0, 0.3)
    write_wav(tmp_path / "u8.wav", sig, width=1)
    write_wav(tmp_path / "st.wav", sig, channels=2)
    write_wav(tmp_path / "hi.wav", sine(440.0, 0.3, rate=16000), rate=16000)
    for name, tol in [("st.wav", 1e-6), ("u8.wav", 0.1), ("hi.wav", 0.1)]:
        img = D.wav_to_image(tmp_path / name)
        assert img.shape == (1, 32, 32)
        assert np.abs(img - ref)[:, :, :18].mean() < tol, name
    with pytest.raises(UsageError, match="height"):
        load_dataset(wav_dir, spectrogram=SpectrogramConfig(height=500))


def test_wav_silence_and_other_names(tmp_path: Path) -> None:
    write_wav(tmp_path / "b.wav", np.zeros(800))
    write_wav(tmp_path / "a.wav", sine(1000.0, 0.2))
    ds = load_dataset(tmp_path)
    assert ds.y is None and len(ds) == 2 and ds.preprocessing["split"] == "all"
    assert np.all(ds.x[1] == 0)  # b.wav (sorted by name) is silent -> all zeros
    write_wav(tmp_path / "1_x_0.wav", sine(500.0, 0.2))
    with pytest.raises(MergeError, match=r"a\.wav"):
        load_dataset(tmp_path)


def test_wav_corrupt(wav_dir: Path) -> None:
    bad = wav_dir / "recordings" / "3_spk_2.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage")
    with pytest.raises(MergeError, match="3_spk_2.wav"):
        load_dataset(wav_dir)


# ----------------------------------------------------------------------------------------------
# errors, arguments, checks


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="nope.npz"):
        load_dataset(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"\x00\x01 not a zip")
    with pytest.raises(MergeError, match="junk.npz"):
        load_dataset(tmp_path / "junk.npz")
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 2)))
    with pytest.raises(MergeError, match=r"nox.npz: no array 'x'.*images"):
        load_dataset(tmp_path / "nox.npz")
    np.savez(tmp_path / "len.npz", x=np.zeros((3, 2)), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(MergeError, match=r"len.npz: x has 3 samples but y has 2"):
        load_dataset(tmp_path / "len.npz")
    np.savez(tmp_path / "yfl.npz", x=np.zeros((2, 2)), y=np.array([0.5, 1.0]))
    with pytest.raises(MergeError, match="yfl.npz"):
        load_dataset(tmp_path / "yfl.npz")
    np.savez(tmp_path / "prep.npz", x=np.zeros((2, 2)), preprocessing=np.array("{not json"))
    with pytest.raises(MergeError, match="prep.npz"):
        load_dataset(tmp_path / "prep.npz")
    (tmp_path / "data.txt").write_text("1,2,3")
    with pytest.raises(MergeError, match="data.txt: unsupported"):
        load_dataset(tmp_path / "data.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="empty: folder has no"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(UsageError, match="split"):
        load_dataset(tmp_path / "empty", split="validation")
    with pytest.raises(UsageError, match="limit"):
        load_dataset(tmp_path / "empty", limit=-1)
    with pytest.raises(MergeError, match="x has 2 samples but y has 1"):
        Dataset(np.zeros((2, 1), np.float32), np.zeros(1, np.int64), "mem", {})


def test_parse_task_paths() -> None:
    assert parse_task_paths(["a=x.npz", "b=dir/with=sign"]) == {"a": "x.npz", "b": "dir/with=sign"}
    assert parse_task_paths([]) == {}
    with pytest.raises(UsageError, match="'x.npz'"):
        parse_task_paths(["a=1.npz", "x.npz"])
    with pytest.raises(UsageError, match="twice"):
        parse_task_paths(["a=1.npz", "a=2.npz"])
    with pytest.raises(UsageError, match="'=b'"):
        parse_task_paths(["=b"])


def test_check_fits() -> None:
    ds = Dataset(np.zeros((2, 1, 32, 32), np.float32), None, "d.npz", {})
    check_fits(ds, ["N", 1, 32, 32], "tensor(float)", "m.onnx")
    check_fits(ds, [None, 1, "H", "W"], np.float32, "m.onnx")
    check_fits(ds, [1, 1, 32, -1], 1, "m.onnx")  # batch dim ignored; -1 and TensorProto.FLOAT
    with pytest.raises(MergeError) as e:
        check_fits(ds, ["N", 1, 28, 28], "float32", "fashion.onnx", input_name="input")
    assert str(e.value) == (
        "fashion.onnx: data d.npz has samples of shape (1,32,32) but the model input input takes (1,28,28)"
    )
    with pytest.raises(MergeError, match=r"\(1,32,32\) but the model input x takes \(1024\)"):
        check_fits(ds, ["N", 1024], "float32", "m.onnx", input_name="x")
    with pytest.raises(MergeError, match="m.onnx: the model input ids has type int64; only float32"):
        check_fits(ds, ["N", 1, 32, 32], 7, "m.onnx", input_name="ids")
    with pytest.raises(MergeError, match="type float16"):
        check_fits(ds, ["N", 1, 32, 32], np.float16, "m.onnx")


# ----------------------------------------------------------------------------------------------
# resizing


@pytest.mark.parametrize("h, w, out_h, out_w", [(28, 28, 32, 32), (28, 28, 14, 14), (28, 28, 56, 56), (7, 5, 9, 3), (1, 4, 3, 4)])
def test_resize_bilinear_matches_torch(h: int, w: int, out_h: int, out_w: int) -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).random((4, 1, h, w)).astype(np.float32)
    got = D.resize_bilinear(x, out_h, out_w)
    assert got.shape == (4, 1, out_h, out_w) and got.dtype == np.float32
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    a = D.bilinear_matrix(h, out_h)
    assert a.shape == (out_h, h) and np.allclose(a.sum(axis=1), 1.0) and a.min() >= 0
    np.testing.assert_array_equal(D.bilinear_matrix(h, h), np.eye(h))  # same size: unchanged
    with pytest.raises(UsageError, match="positive"):
        D.bilinear_matrix(0, 3)


def test_load_named_size_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad sizes are refused before any file is read."""
    monkeypatch.setenv("ONNXMERGE_DATA", str(tmp_path))
    with pytest.raises(UsageError, match="size 28 does not fit dataset 'fsdd'"):
        D.load_named("fsdd", size=28)
    with pytest.raises(UsageError, match="bad size 0"):
        D.load_named("mnist", size=0)
    with pytest.raises(UsageError, match="bad size 32.0"):
        D.load_named("mnist", size=32.0)


def test_shared_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXMERGE_DATA", str(tmp_path))
    assert D.shared_data_dir() == tmp_path
    with pytest.raises(MergeError, match="dataset 'mnist' not found"):
        D.load_named("mnist")
    with pytest.raises(UsageError, match="unknown dataset 'cifar'"):
        D.load_named("cifar")
    monkeypatch.setenv("ONNXMERGE_DATA", str(tmp_path / "missing"))
    assert D.shared_data_dir() is None
    with pytest.raises(MergeError, match="real datasets not found"):
        D.load_named("fsdd")


# ----------------------------------------------------------------------------------------------
# the real datasets (only where ../shared/data exists)


@pytest.fixture
def real() -> Path:
    root = D.shared_data_dir()
    if root is None:
        pytest.skip(SKIP_REAL)
    return root


def test_real_mnist_and_fashion(real: Path) -> None:
    m = D.load_named("mnist", limit=100)
    assert m.x.shape == (100, 1, 28, 28) and list(m.y[:5]) == [7, 2, 1, 0, 4]
    assert m.preprocessing["dataset"] == "mnist" and m.x.max() == 1.0
    f = D.load_named("fashion-mnist", split="train", limit=10)
    assert f.x.shape == (10, 1, 28, 28) and list(f.y[:3]) == [9, 0, 0]


def test_real_resized(real: Path) -> None:
    torch = pytest.importorskip("torch")
    plain = D.load_named("fashion-mnist", limit=50)
    big = D.load_named("fashion-mnist", limit=50, size=32)
    assert big.x.shape == (50, 1, 32, 32) and big.x.dtype == np.float32
    np.testing.assert_array_equal(big.y, plain.y)
    want = torch.nn.functional.interpolate(torch.from_numpy(plain.x), size=(32, 32), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(big.x, want.numpy(), rtol=0, atol=1e-6)
    prep = big.preprocessing
    assert prep["layout"] == "(N, 1, 32, 32)" and prep["resize"].startswith("bilinear 28x28 -> 32x32, half-pixel")
    assert {k: v for k, v in prep.items() if k not in ("layout", "resize")} == {
        k: v for k, v in plain.preprocessing.items() if k != "layout"
    }
    json.dumps(prep)
    # the stored size is no resize at all; fsdd takes its own size
    same = D.load_named("mnist", limit=5, size=28)
    assert same.preprocessing == D.load_named("mnist", limit=5).preprocessing and "resize" not in same.preprocessing
    assert D.load_named("fsdd", limit=3, size=32).x.shape == (3, 1, 32, 32)


def test_real_fsdd(real: Path) -> None:
    ds = D.load_named("fsdd")
    assert ds.x.shape == (300, 1, 32, 32)
    assert np.bincount(ds.y).tolist() == [30] * 10
    assert ds.preprocessing["split"] == "test"


@pytest.mark.parametrize(
    "name, npz, limit",
    [("fsdd", "digits_eval.npz", None), ("fashion-mnist", "fashion_eval.npz", 1000)],
)
def test_shipped_eval_sets_reproducible(real: Path, name: str, npz: str, limit: int | None) -> None:
    """The example eval sets hold exactly what load_named makes today (the preprocessing the
    example models were trained with)."""
    path = EXAMPLES / npz
    assert path.is_file(), f"{path} is missing: run tools/train_models.py"
    shipped = load_dataset(path)
    fresh = D.load_named(name, limit=limit)
    np.testing.assert_array_equal(shipped.x, fresh.x)
    np.testing.assert_array_equal(shipped.y, fresh.y)
    assert {k: v for k, v in shipped.preprocessing.items() if k != "subset"} == fresh.preprocessing
