"""Per-task calibration and evaluation data (DESIGN.md, "Data").

`load_dataset(path)` reads one of:

- an `.npz` file with `x` (any numeric array, cast to float32) and optionally `y` (integer labels,
  cast to int64) and `preprocessing` (a JSON string saying how `x` was made); taken as stored;
- a folder of MNIST-format IDX files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
  `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`; `-idx3-` may also be `.idx3-`):
  uint8 pixels / 255 -> float32 in [0, 1], shape (N, 1, rows, cols);
- a folder of WAV files, or a folder with a `recordings/` subfolder of them (the Free Spoken Digit
  Dataset layout): each file becomes one log-spectrogram image, see `SpectrogramConfig`.

Every `Dataset` carries `preprocessing`, a JSON-able record of exactly how `x` was made from the raw
files, because calibration data must be preprocessed exactly like the model's training data.
`save_npz` writes a dataset with that record, and `load_dataset` reads it back unchanged.

Bad input (a missing path, an unreadable or corrupt file, an `.npz` without `x`, `x` and `y` of
different lengths, ...) raises `MergeError` with a one-line message that names the file; a bad
argument (an unknown split or dataset name) raises `UsageError`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import wave
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onnxmerge.errors import MergeError, UsageError
from onnxmerge.model.saving import write_bytes_atomic

__all__ = [
    "Dataset",
    "SpectrogramConfig",
    "NAMED_DATASETS",
    "load_dataset",
    "load_named",
    "save_npz",
    "shared_data_dir",
    "parse_task_paths",
    "check_fits",
    "check_labels",
    "wav_to_image",
    "log_spectrogram",
    "bilinear_matrix",
    "resize_bilinear",
]

SPLITS = ("train", "test", "all")


# ----------------------------------------------------------------------------------------------
# the dataset


@dataclass
class Dataset:
    """Samples `x` (float32, NCHW), labels `y` (int64, or None), where they came from (`source`) and
    how `x` was made from the raw files (`preprocessing`, JSON-able)."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    preprocessing: dict

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise MergeError(
                f"{self.source}: x has {len(self.x)} samples but y has {len(self.y)} labels"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def take(self, n: int) -> "Dataset":
        """The first `n` samples (all of them if there are fewer)."""
        return Dataset(
            self.x[:n], None if self.y is None else self.y[:n], self.source, dict(self.preprocessing)
        )

    def split(self, n: int, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """(the rest, `n` held-out samples drawn at random by `numpy.random.default_rng(seed)`),
        each in the original order."""
        held = np.zeros(len(self), bool)
        held[np.random.default_rng(seed).choice(len(self), size=n, replace=False)] = True
        return tuple(Dataset(self.x[m], None if self.y is None else self.y[m], self.source, dict(self.preprocessing))
                     for m in (~held, held))

    def subset(self, n: int, seed: int = 0) -> "Dataset":
        """`n` samples drawn without replacement, in their original order, chosen by
        `numpy.random.default_rng(seed)`; the whole dataset if `n >= len(self)`."""
        if n >= len(self):
            return self.take(len(self))
        idx = np.sort(np.random.default_rng(seed).choice(len(self), size=n, replace=False))
        return Dataset(
            self.x[idx], None if self.y is None else self.y[idx], self.source, dict(self.preprocessing)
        )


# ----------------------------------------------------------------------------------------------
# spectrograms


@dataclass(frozen=True)
class SpectrogramConfig:
    """How a WAV recording becomes a (1, height, width) float32 image in [0, 1].

    1. Samples: PCM integers scaled to [-1, 1) (16-bit: /32768; 8-bit: (v-128)/128; 24/32-bit alike),
       channels averaged. A file whose rate differs from `sample_rate` is resampled to it by linear
       interpolation (`numpy.interp`).
    2. Fixed length: the signal is zero-padded at the end or cut to exactly
       `(frames - 1) * hop + n_fft` samples (defaults: 8,320 samples = 1.04 s at 8 kHz).
    3. STFT: `frames` frames starting at `t * hop` (no centring), each multiplied by a periodic Hann
       window of length `n_fft`, `numpy.fft.rfft`; power = |X|^2; the Nyquist bin is dropped, which
       leaves `n_fft // 2` frequency bins (defaults: 64 frames x 128 bins).
    4. Resize: power averaged over equal groups: output row r (frequency, row 0 = lowest) averages
       bins [r*F//height, (r+1)*F//height), output column c (time) frames [c*T//width, (c+1)*T//width)
       (defaults: 4 bins x 2 frames each).
    5. Scale: dB = 10*log10(max(power, amin)); image = clip((dB - max(dB)) / top_db + 1, 0, 1), i.e. the
       loudest cell of each image is 1 and everything `top_db` dB or more below it is 0 (per-image
       scaling, so recording gain does not matter). A silent recording gives an all-zero image.
    """

    sample_rate: int = 8000
    n_fft: int = 256
    hop: int = 128
    frames: int = 64
    height: int = 32
    width: int = 32
    top_db: float = 80.0
    amin: float = 1e-10

    def validate(self) -> None:
        problems = []
        if self.sample_rate <= 0 or self.n_fft < 2 or self.hop <= 0 or self.frames <= 0:
            problems.append("sample_rate, n_fft, hop and frames must be positive (n_fft >= 2)")
        if not 0 < self.height <= self.n_fft // 2:
            problems.append(f"height must be in 1..n_fft//2 = {self.n_fft // 2}")
        if not 0 < self.width <= self.frames:
            problems.append(f"width must be in 1..frames = {self.frames}")
        if self.top_db <= 0 or self.amin <= 0:
            problems.append("top_db and amin must be positive")
        if problems:
            raise UsageError(f"bad spectrogram settings {self}: " + "; ".join(problems))

    def record(self) -> dict:
        """The JSON-able description stored in `Dataset.preprocessing`."""
        return {
            **asdict(self),
            "samples": "PCM ints scaled to [-1,1), channels averaged, linear-interp resample to sample_rate",
            "length": "zero-pad at end / cut to (frames-1)*hop+n_fft samples",
            "window": "periodic hann",
            "stft": "frame t starts at t*hop, no centring; power=|rfft|^2; Nyquist bin dropped",
            "resize": "mean of power over groups [i*n//size, (i+1)*n//size) along frequency and time",
            "scaling": "db=10*log10(max(power,amin)); x=clip((db-max(db))/top_db+1, 0, 1); silent -> 0",
            "layout": "(1, height, width): rows = frequency ascending, columns = time",
        }


def _group_mean(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = a.shape[axis]
    edges = (np.arange(size + 1) * n) // size
    sums = np.add.reduceat(a, edges[:-1], axis=axis)
    counts = np.diff(edges).astype(a.dtype)
    shape = [1] * a.ndim
    shape[axis] = size
    return sums / counts.reshape(shape)


def log_spectrogram(signal: np.ndarray, cfg: SpectrogramConfig = SpectrogramConfig()) -> np.ndarray:
    """A mono signal in [-1, 1] at `cfg.sample_rate` -> a (height, width) float32 image in [0, 1]
    (steps 2-5 of `SpectrogramConfig`)."""
    n_fft, hop, frames = cfg.n_fft, cfg.hop, cfg.frames
    need = (frames - 1) * hop + n_fft
    s = np.zeros(need, dtype=np.float64)
    m = min(len(signal), need)
    s[:m] = signal[:m]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    spec = np.fft.rfft(s[idx] * window, axis=1)[:, : n_fft // 2]  # (frames, bins)
    power = (spec.real**2 + spec.imag**2).T  # (bins, frames): rows = frequency
    power = _group_mean(_group_mean(power, cfg.height, 0), cfg.width, 1)
    if power.max() <= cfg.amin:
        return np.zeros((cfg.height, cfg.width), dtype=np.float32)
    db = 10.0 * np.log10(np.maximum(power, cfg.amin))
    img = np.clip((db - db.max()) / cfg.top_db + 1.0, 0.0, 1.0)
    return img.astype(np.float32)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float64 samples in [-1, 1) and the sample rate; MergeError naming the file if unreadable."""
    try:
        with wave.open(str(path), "rb") as w:
            n_ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError, ValueError) as e:
        raise MergeError(f"{path}: not a readable PCM WAV file ({e})") from None
    if n_ch < 1 or rate <= 0:
        raise MergeError(f"{path}: bad WAV header ({n_ch} channels, {rate} Hz)")
    usable = len(raw) - len(raw) % (width * n_ch)
    raw = raw[:usable]
    if width == 1:
        v = (np.frombuffer(raw, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width == 2:
        v = np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        iv = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        iv = np.where(iv >= 1 << 23, iv - (1 << 24), iv)
        v = iv.astype(np.float64) / float(1 << 23)
    elif width == 4:
        v = np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)
    else:
        raise MergeError(f"{path}: unsupported WAV sample width of {width} bytes")
    v = v.reshape(-1, n_ch).mean(axis=1)
    return v, rate


def _resample(v: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target or len(v) == 0:
        return v
    n_out = int(round(len(v) * target / rate))
    t_out = np.arange(n_out) / target
    t_in = np.arange(len(v)) / rate
    return np.interp(t_out, t_in, v)


def wav_to_image(path: str | os.PathLike, cfg: SpectrogramConfig = SpectrogramConfig()) -> np.ndarray:
    """One WAV file -> a (1, height, width) float32 image (all steps of `SpectrogramConfig`)."""
    v, rate = _read_wav(Path(path))
    return log_spectrogram(_resample(v, rate, cfg.sample_rate), cfg)[None]


# ----------------------------------------------------------------------------------------------
# loaders

_FSDD_NAME = re.compile(r"^(\d)_([^_]+)_(\d+)\.wav$", re.IGNORECASE)
FSDD_TEST_TAKES = range(0, 5)  # takes 0-4 of each speaker and digit are the test split


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
        raise UsageError(f"bad limit {limit!r}: use a non-negative integer")


def _load_npz(path: Path, limit: int | None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if "x" not in names:
                raise MergeError(
                    f"{path}: no array 'x' in the .npz file (it has: {', '.join(sorted(names)) or 'nothing'})"
                )
            x = z["x"]
            y = z["y"] if "y" in names else None
            prep_raw = z["preprocessing"] if "preprocessing" in names else None
    except MergeError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise MergeError(f"{path}: not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if x.dtype.kind not in "biuf" or x.ndim < 1:
        raise MergeError(f"{path}: 'x' must be a numeric array with a batch dimension, got {x.dtype} {x.shape}")
    x = x.astype(np.float32, copy=False)
    if y is not None:
        if y.ndim != 1:
            raise MergeError(f"{path}: 'y' must be a 1-D array of labels, got shape {y.shape}")
        if y.dtype.kind == "f":
            if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
                raise MergeError(f"{path}: 'y' must hold integer class labels, got non-integer values")
        elif y.dtype.kind not in "biu":
            raise MergeError(f"{path}: 'y' must hold integer class labels, got {y.dtype}")
        y = y.astype(np.int64, copy=False)
        if len(y) != len(x):
            raise MergeError(f"{path}: x has {len(x)} samples but y has {len(y)} labels")
    if prep_raw is None:
        prep: dict = {"format": "npz"}
    else:
        try:
            prep = json.loads(str(prep_raw.item() if prep_raw.ndim == 0 else prep_raw[0]))
        except (ValueError, IndexError) as e:
            raise MergeError(f"{path}: 'preprocessing' is not a JSON string ({e})") from None
        if not isinstance(prep, dict):
            raise MergeError(f"{path}: 'preprocessing' must be a JSON object, got {type(prep).__name__}")
    if limit is not None:
        x = x[:limit]
        y = None if y is None else y[:limit]
    return Dataset(x, y, str(path), prep)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    """`{prefix}-{kind}-idx{1,3}-ubyte[.gz]` (or with `.idx` instead of `-idx`) in `folder`."""
    dims = "3" if kind == "images" else "1"
    for sep in ("-", "."):
        for gz in ("", ".gz"):
            p = folder / f"{prefix}-{kind}{sep}idx{dims}-ubyte{gz}"
            if p.is_file():
                return p
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise MergeError(f"{path}: cannot read IDX file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MergeError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise MergeError(f"{path}: IDX data type 0x{data[2]:02x} is not supported (only unsigned bytes, 0x08)")
    if data[3] != ndim:
        raise MergeError(f"{path}: IDX file has {data[3]} dimensions, expected {ndim}")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise MergeError(f"{path}: IDX file is truncated (incomplete header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - head != size:
        raise MergeError(
            f"{path}: IDX file is truncated or too long: header says {shape} = {size} bytes, file has {len(data) - head}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(shape)


def _is_idx_dir(folder: Path) -> bool:
    return any(_find_idx(folder, p, "images") for p in ("train", "t10k"))


def _load_idx(folder: Path, split: str, limit: int | None) -> Dataset:
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    xs, ys, files = [], [], []
    for prefix in prefixes:
        img = _find_idx(folder, prefix, "images")
        if img is None:
            raise MergeError(f"{folder}: no {prefix}-images-idx3-ubyte[.gz] file for the {split} split")
        lab = _find_idx(folder, prefix, "labels")
        x = _read_idx(img, 3)
        files.append(img.name)
        if lab is not None:
            y = _read_idx(lab, 1)
            if len(y) != len(x):
                raise MergeError(f"{lab}: {len(y)} labels but {img.name} has {len(x)} images")
            files.append(lab.name)
        else:
            y = None
        xs.append(x)
        ys.append(y)
    if any(y is None for y in ys):
        y_all = None
    else:
        y_all = np.concatenate(ys).astype(np.int64)
    x_u8 = np.concatenate(xs)
    if limit is not None:
        x_u8 = x_u8[:limit]
        y_all = None if y_all is None else y_all[:limit]
    x = (x_u8.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    prep = {
        "format": "idx",
        "split": split,
        "files": files,
        "scaling": "uint8 / 255 -> float32 in [0, 1]",
        "normalization": "none (no mean/std)",
        "layout": f"(N, 1, {x.shape[2]}, {x.shape[3]})",
        "order": "as stored in the files" + (" (train, then t10k)" if split == "all" else ""),
        "limit": limit,
    }
    return Dataset(x, y_all, str(folder), prep)


def _wav_files(folder: Path) -> tuple[Path, list[Path]]:
    def wavs(d: Path) -> list[Path]:
        return [p for p in d.iterdir() if p.is_file() and p.suffix.lower() == ".wav"]

    files = wavs(folder)
    if not files and (folder / "recordings").is_dir():
        folder = folder / "recordings"
        files = wavs(folder)
    return folder, files


def _load_wav_dir(folder: Path, files: list[Path], split: str, limit: int | None, cfg: SpectrogramConfig) -> Dataset:
    cfg.validate()
    matches = {p: _FSDD_NAME.match(p.name) for p in files}
    named = [p for p, m in matches.items() if m]
    if named and len(named) != len(files):
        bad = sorted(p.name for p, m in matches.items() if not m)[0]
        raise MergeError(
            f"{folder / bad}: file name does not follow {{digit}}_{{speaker}}_{{take}}.wav like the other WAV files"
        )
    if named:
        def key(p: Path) -> tuple:
            m = matches[p]
            return (int(m.group(1)), m.group(2), int(m.group(3)), p.name)

        files = sorted(files, key=key)
        if split != "all":
            want_test = split == "test"
            files = [p for p in files if (int(matches[p].group(3)) in FSDD_TEST_TAKES) == want_test]
        labels: np.ndarray | None = np.array([int(matches[p].group(1)) for p in files], dtype=np.int64)
        split_rule = "FSDD: takes 0-4 test, 5-49 (all others) train"
        used_split = split
        order = "sorted by (digit, speaker, take)"
    else:
        files = sorted(files, key=lambda p: p.name)
        labels = None
        split_rule = "none: file names are not {digit}_{speaker}_{take}.wav, all files used, no labels"
        used_split = "all"
        order = "sorted by file name"
    if limit is not None:
        files = files[:limit]
        labels = None if labels is None else labels[:limit]
    x = np.zeros((len(files), 1, cfg.height, cfg.width), dtype=np.float32)
    resampled = 0
    for i, p in enumerate(files):
        v, rate = _read_wav(p)
        if rate != cfg.sample_rate:
            resampled += 1
        x[i, 0] = log_spectrogram(_resample(v, rate, cfg.sample_rate), cfg)
    prep = {
        "format": "wav-log-spectrogram",
        "split": used_split,
        "split_rule": split_rule,
        "label": "leading digit of {digit}_{speaker}_{take}.wav" if labels is not None else None,
        "order": order,
        "spectrogram": cfg.record(),
        "resampled_files": resampled,
        "limit": limit,
    }
    return Dataset(x, labels, str(folder), prep)


def load_dataset(
    path: str | os.PathLike,
    *,
    split: str = "test",
    spectrogram: SpectrogramConfig = SpectrogramConfig(),
    limit: int | None = None,
) -> Dataset:
    """Load an `.npz` file, an IDX folder or a WAV folder (see the module docstring).

    `split` ("train", "test" or "all") picks the IDX files (train / t10k) or the FSDD takes; an `.npz`
    file is taken as stored. `limit` keeps the first `limit` samples. `spectrogram` applies to WAV only.
    """
    _check_split(split)
    _check_limit(limit)
    p = Path(path)
    if not p.exists():
        raise MergeError(f"{p}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return _load_npz(p, limit)
        raise MergeError(f"{p}: unsupported data file: give an .npz file, an IDX folder or a folder of WAV files")
    if p.is_dir():
        if _is_idx_dir(p):
            return _load_idx(p, split, limit)
        folder, wavs = _wav_files(p)
        if wavs:
            return _load_wav_dir(folder, wavs, split, limit, spectrogram)
        raise MergeError(f"{p}: folder has no MNIST-format IDX files and no WAV files")
    raise MergeError(f"{p}: not a file or folder")


def save_npz(path: str | os.PathLike, ds: Dataset) -> Path:
    """Write `ds` as a compressed `.npz` (x float32, y int64 if present, preprocessing as JSON) that
    `load_dataset` reads back unchanged. Deterministic bytes for equal content."""
    path = Path(path)
    arrays: dict[str, Any] = {
        "x": np.ascontiguousarray(ds.x, dtype=np.float32),
        "preprocessing": np.array(json.dumps(ds.preprocessing, sort_keys=True)),
    }
    if ds.y is not None:
        arrays["y"] = np.ascontiguousarray(ds.y, dtype=np.int64)
    buffer = io.BytesIO()  # deterministic bytes, then the project's one atomic writer
    np.savez_compressed(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# image resizing


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """The (n_out, n_in) float64 matrix of 1-D linear interpolation with half-pixel centres: output
    sample i reads the input at src = (i + 0.5) * n_in / n_out - 0.5, clamped to >= 0, from samples
    floor(src) and floor(src) + 1 (that one clamped to n_in - 1). The same weights as
    torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False) per axis;
    rows sum to 1. No antialiasing: shrinking skips samples."""
    if n_in < 1 or n_out < 1:
        raise UsageError(f"bad resize {n_in} -> {n_out}: sizes must be positive")
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    a = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(a, (rows, i0), 1.0 - w1)
    np.add.at(a, (rows, i1), w1)
    return a


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Images (..., H, W) -> (..., height, width) float32, bilinear with half-pixel centres
    (`bilinear_matrix` along each axis: A_h @ img @ A_w.T)."""
    a_h = bilinear_matrix(x.shape[-2], height).astype(np.float32)
    a_w_t = bilinear_matrix(x.shape[-1], width).T.astype(np.float32)
    return np.matmul(np.matmul(a_h, x.astype(np.float32, copy=False)), a_w_t)


# ----------------------------------------------------------------------------------------------
# the project's real datasets

NAMED_DATASETS = {"mnist": "mnist", "fashion-mnist": "fashion-mnist", "fsdd": "fsdd"}


def shared_data_dir() -> Path | None:
    """The real datasets: `$ONNXMERGE_DATA` if set, else `<repo root>/../shared/data`; None if absent."""
    env = os.environ.get("ONNXMERGE_DATA")
    if env:
        p = Path(env)
    else:
        p = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return p if p.is_dir() else None


def load_named(
    name: str,
    split: str = "test",
    limit: int | None = None,
    *,
    spectrogram: SpectrogramConfig = SpectrogramConfig(),
    size: int | None = None,
) -> Dataset:
    """One of the real datasets ("mnist", "fashion-mnist", "fsdd") from `shared_data_dir()`.

    `size` (images only): resize the 28x28 MNIST / Fashion-MNIST images to size x size with
    `resize_bilinear` (half-pixel centres, as torch interpolate align_corners=False), recorded in
    `preprocessing["resize"]`; None or 28 keeps them as stored. For "fsdd" the spectrogram settings
    decide the image size: `size` must be None or equal to their height and width (32 x 32 by default).
    """
    if name not in NAMED_DATASETS:
        raise UsageError(f"unknown dataset {name!r}: use one of {', '.join(NAMED_DATASETS)}")
    if size is not None and (not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1):
        raise UsageError(f"bad size {size!r}: use a positive integer")
    if name == "fsdd" and size is not None and not size == spectrogram.height == spectrogram.width:
        raise UsageError(
            f"size {size} does not fit dataset 'fsdd': its images are {spectrogram.height}x{spectrogram.width} "
            "(set by the spectrogram settings); leave size out"
        )
    root = shared_data_dir()
    if root is None:
        where = os.environ.get("ONNXMERGE_DATA") or str(Path(__file__).resolve().parent.parent.parent / "shared" / "data")
        raise MergeError(f"{where}: real datasets not found (set ONNXMERGE_DATA to the folder that holds {name}/)")
    folder = root / NAMED_DATASETS[name]
    if not folder.is_dir():
        raise MergeError(f"{folder}: dataset {name!r} not found")
    ds = load_dataset(folder, split=split, spectrogram=spectrogram, limit=limit)
    ds.preprocessing = {"dataset": name, **ds.preprocessing}
    if name != "fsdd" and size is not None:
        h, w = ds.x.shape[2], ds.x.shape[3]
        if (h, w) != (size, size):
            ds.x = resize_bilinear(ds.x, int(size), int(size))
            ds.preprocessing["layout"] = f"(N, 1, {size}, {size})"
            ds.preprocessing["resize"] = (
                f"bilinear {h}x{w} -> {size}x{size}, half-pixel centres "
                "(as torch interpolate align_corners=False, antialias=False), after scaling"
            )
    return ds


# ----------------------------------------------------------------------------------------------
# command-line helpers and checks


def parse_task_paths(items: Sequence[str]) -> dict[str, str]:
    """["fashion=f.npz", "digits=d/"] -> {"fashion": "f.npz", "digits": "d/"}."""
    out: dict[str, str] = {}
    for item in items:
        task, sep, path = item.partition("=")
        task, path = task.strip(), path.strip()
        if not sep or not task or not path:
            raise UsageError(f"bad data argument {item!r}: expected TASK=PATH")
        if task in out:
            raise UsageError(f"bad data argument {item!r}: task {task!r} is given twice")
        out[task] = path
    return out


def _fmt_shape(dims: Sequence[Any]) -> str:
    return "(" + ",".join("?" if d is None else str(d) for d in dims) + ")"


def _is_float32(dtype: Any) -> bool:
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype) == 1  # onnx.TensorProto.FLOAT
    if isinstance(dtype, str) and dtype.strip().lower() in ("tensor(float)", "float", "float32"):
        return True
    try:
        return np.dtype(dtype) == np.float32
    except TypeError:
        return False


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        try:
            import onnx

            return onnx.TensorProto.DataType.Name(int(dtype)).lower()
        except Exception:  # noqa: BLE001 - only for the message
            return f"onnx type {int(dtype)}"
    try:
        return str(np.dtype(dtype))
    except TypeError:
        return str(dtype)


def check_fits(
    dataset: Dataset, shape: Sequence[int | str | None], dtype: Any, where: str, input_name: str = "input"
) -> None:
    """Refuse data whose per-sample shape or type does not fit a model input.

    `shape` is the model input's shape as in ONNX value info (the first, batch dimension is ignored;
    str, None and non-positive dims are symbolic and match anything); `dtype` is a numpy dtype, a
    string such as "float32" / "tensor(float)" or an ONNX TensorProto type number. Only float32 model
    inputs are supported for now. Raises a one-line MergeError that starts with `where`.
    """
    if not _is_float32(dtype):
        raise MergeError(
            f"{where}: the model input {input_name} has type {_dtype_name(dtype)}; only float32 inputs are supported"
        )
    if dataset.x.dtype != np.float32:
        raise MergeError(f"{where}: data {dataset.source} has type {dataset.x.dtype}, expected float32")
    n = int(dataset.x.shape[0]) if dataset.x.ndim else 0  # any object with x, y, source (not only a Dataset)
    if n == 0:
        raise MergeError(f"{where}: data {dataset.source} has no samples")
    shape = list(shape)
    if not shape:
        raise MergeError(f"{where}: the model input {input_name} is a scalar; it needs a batch dimension")
    model_sample = shape[1:]
    data_sample = tuple(int(d) for d in dataset.x.shape[1:])
    ok = len(model_sample) == len(data_sample) and all(
        not isinstance(m, (int, np.integer)) or m <= 0 or int(m) == d for m, d in zip(model_sample, data_sample)
    )
    if not ok:
        raise MergeError(
            f"{where}: data {dataset.source} has samples of shape {_fmt_shape(data_sample)} "
            f"but the model input {input_name} takes {_fmt_shape(model_sample)}"
        )
    # after the shape: a NaN sample would turn calibrated weights and measured accuracies into NaN
    finite = np.isfinite(dataset.x).reshape(n, -1).all(axis=1)
    if not finite.all():
        raise MergeError(f"{where}: data {dataset.source} has NaN or infinite values in "
                         f"{int((~finite).sum())} of its {n} samples (the first: sample {int(np.argmin(finite))})")


def check_labels(dataset: Dataset, classes: int | None, where: str, output_name: str = "logits") -> None:
    """Refuse labels that are not class indices of a model output with `classes` classes (None: the
    number is unknown, only negative labels are refused). A label out of range would make
    calibration's cross-entropy fail and evaluation count the sample as wrong, silently."""
    if dataset.y is None or len(dataset.y) == 0:
        return
    low, high = int(dataset.y.min()), int(dataset.y.max())
    if low < 0 or (classes is not None and high >= classes):
        bad = low if low < 0 else high
        allowed = f"0 to {classes - 1}" if classes is not None else "0 or more"
        raise MergeError(f"{where}: data {dataset.source} has label {bad}, but the model output {output_name} "
                         f"has {classes if classes is not None else 'an unknown number of'} classes "
                         f"(labels must be {allowed})")
