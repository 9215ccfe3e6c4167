"""Datasets as uint8 tensors: Fashion-MNIST, CIFAR-10 and a seeded synthetic set.

Images stay uint8 ``(N, C, H, W)`` in memory (Fashion-MNIST: 55 MB, CIFAR-10: 184 MB) and are turned
into normalized float32 per batch by :func:`to_float`. A loaded dataset is cached per process, so
several clients run in one process load it once. Callers must treat the cached tensors as read-only
(index them, never write into them).

Where the files are looked for, in order: ``$NMOE_DATA`` (its dataset subfolder, then itself),
``./data`` (likewise), ``DataConfig.root`` (likewise), then the system folder Debian's
``dataset-fashion-mnist`` package installs. Only when nothing is found and ``data.download`` is true
does torchvision download into ``./data``.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import os
import pickle
import shutil
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

from nmoe.errors import DataError

from .config import DataConfig

__all__ = [
    "DatasetInfo",
    "ImageDataset",
    "dataset_info",
    "DATASET_STATS",
    "CLASS_NAMES",
    "load_dataset",
    "clear_cache",
    "to_float",
    "normalize",
    "read_idx",
    "load_fashion_mnist",
    "load_cifar10",
    "make_synthetic",
    "restricted_unpickle",
]

# Per-channel (mean, std) of the training split in [0, 1] pixel units. Fashion-MNIST and CIFAR-10 are
# the usual population statistics; synthetic was measured on make_synthetic(6000, seed=0).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "synthetic": ((0.1210,), (0.1710,)),
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                      "sandal", "shirt", "sneaker", "bag", "ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
    "synthetic": tuple(f"pattern{c}" for c in range(10)),
}



@dataclass(frozen=True)
class DatasetInfo:
    """What models need to know about a dataset without loading it."""

    name: str
    channels: int
    size: int
    """Image height = width."""
    classes: int
    """Number of classes."""
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_SHAPES = {"fashion_mnist": (1, 28), "cifar10": (3, 32), "synthetic": (1, 28)}


def dataset_info(name: str) -> DatasetInfo:
    """Shape, class count and normalization of a dataset, by name."""
    if name not in DATASET_STATS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASET_STATS)}")
    channels, size = _SHAPES[name]
    names = CLASS_NAMES[name]
    return DatasetInfo(name, channels, size, len(names), names, *DATASET_STATS[name])


# Folders a system package may install into; a module constant so tests can point it elsewhere.
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
    "cifar10": (),
}

_SUBDIR = {"fashion_mnist": "fashion-mnist", "cifar10": "cifar-10-batches-py"}


@dataclass(frozen=True)
class ImageDataset:
    """Both splits of one dataset, images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    """fashion_mnist, cifar10 or synthetic."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    """Class names, index = label."""
    source: str
    """Where it was loaded from (a folder, or 'synthetic(seed=..)'), for reports."""

    def __post_init__(self) -> None:
        for x, y in ((self.train_x, self.train_y), (self.test_x, self.test_y)):
            assert x.dtype == torch.uint8 and x.ndim == 4, (x.dtype, x.shape)
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],), (y.dtype, y.shape)
        assert self.train_x.shape[1:] == self.test_x.shape[1:]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)


# --------------------------------------------------------------------------- normalization


@functools.lru_cache(maxsize=16)
def _affine(dataset: str, channels: int, dtype: torch.dtype, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset not in DATASET_STATS:
        raise DataError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_STATS)}")
    mean, std = (torch.tensor(v, dtype=torch.float64) for v in DATASET_STATS[dataset])
    if mean.numel() != channels:
        raise DataError(f"{dataset} images have {mean.numel()} channel(s), got a batch with {channels}")
    scale = 1.0 / std
    shift = -mean / std
    return (scale.to(dtype=dtype, device=device).view(1, -1, 1, 1),
            shift.to(dtype=dtype, device=device).view(1, -1, 1, 1))


def normalize(x01: torch.Tensor, dataset: str) -> torch.Tensor:
    """(x - mean) / std for float images in [0, 1], shape (B, C, H, W); keeps the memory format."""
    scale, shift = _affine(dataset, x01.shape[1], x01.dtype, x01.device)
    return torch.addcmul(shift, x01, scale)


def to_float(x: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 (B, C, H, W) -> normalized float32, in one fused pass.

    Elementwise with (1, C, 1, 1) broadcasts, so a channels_last batch stays channels_last.
    """
    if x.dtype != torch.uint8:
        raise DataError(f"to_float expects uint8 images, got {x.dtype}")
    scale, shift = _affine(dataset, x.shape[1], torch.float32, x.device)
    return torch.addcmul(shift, x.to(torch.float32), scale / 255.0)


# --------------------------------------------------------------------------- Fashion-MNIST (IDX)

_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned byte data, 1-d labels / 3-d images
_FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def data_cache_dir() -> Path:
    """Where decompressed copies of gzipped IDX files go: ``$NMOE_DATA_CACHE``, else
    ``~/.cache/nmoe-data`` (apart from the stage cache: clearing one leaves the other)."""
    env = os.environ.get("NMOE_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nmoe-data"


def _decompressed(path: Path) -> Path:
    """An uncompressed copy of a gzipped file, made once and named by the source's path, size and
    mtime (a changed source gets a new copy); written under a temporary name, then renamed, so
    agents starting together never read half a file."""
    st = path.stat()
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    target = data_cache_dir() / f"{path.name.removesuffix('.gz')}-{tag}-{st.st_size}-{st.st_mtime_ns}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzipped) with `ndim` dimensions, validating it.

    The array maps the file copy-on-write (a gzipped file is decompressed once into
    :func:`data_cache_dir`): a process pays only for the pages it touches (a client agent: its own
    partition's rows), and processes reading the same file share them in the page cache.
    """
    if path.suffix == ".gz":
        try:
            path = _decompressed(path)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: cannot decompress into {data_cache_dir()} ({err}); "
                            "set $NMOE_DATA_CACHE to a writable folder") from err
    header = 4 + 4 * ndim
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(header)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err
    if len(raw) < header:
        raise DataError(f"{path}: {size} bytes, shorter than an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path}: IDX magic {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x} "
                        f"(unsigned bytes, {ndim} dimension(s)); is it the right file?")
    dims = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(dims))
    if size != expected:
        raise DataError(f"{path}: {size} bytes, but its header {dims} needs {expected}; "
                        "the file is truncated or corrupt")
    if expected == header:  # mmap cannot map zero bytes
        return np.zeros(dims, dtype=np.uint8)
    # mode "c": writable for torch.from_numpy (no warning, no copy), but writes never reach the file
    return np.memmap(path, dtype=np.uint8, mode="c", offset=header, shape=dims)


def _find_idx(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FMNIST_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):  # uncompressed first: faster
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def load_fashion_mnist(folder: Path) -> ImageDataset:
    """Fashion-MNIST from a folder holding the four IDX files (.gz or not)."""
    files = _find_idx(folder)
    if files is None:
        raise DataError(f"{folder}: not all four Fashion-MNIST IDX files are there "
                        f"({', '.join(_FMNIST_FILES.values())}, optionally .gz)")
    arrays = {key: read_idx(path, 3 if key.endswith("_x") else 1) for key, path in files.items()}
    tensors: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.shape[1:] != (28, 28):
            raise DataError(f"{files[f'{split}_x']}: images are {x.shape[1:]}, expected (28, 28)")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{folder}: {split} split has {x.shape[0]} images but {y.shape[0]} labels")
        if y.size and int(y.max()) > 9:
            raise DataError(f"{files[f'{split}_y']}: label {int(y.max())} outside 0..9")
        tensors[f"{split}_x"] = torch.from_numpy(x).unsqueeze(1)
        tensors[f"{split}_y"] = torch.from_numpy(y.astype(np.int64))
    return ImageDataset("fashion_mnist", classes=CLASS_NAMES["fashion_mnist"], source=str(folder),
                        **tensors)


# --------------------------------------------------------------------------- CIFAR-10 (pickles)

# CIFAR-10's python batches are pickles, and unpickling runs whatever callables the file names: a
# doctored batch file (shared folders, mirrors, caches) would execute code. So the unpickler resolves
# only the few globals the real files and numpy's array pickling need; dicts, lists, strings and ints
# are pickle opcodes and need no globals at all. Protocol-2 files written by Python 3 encode bytes
# through _codecs.encode.
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,  # type: ignore[attr-defined]
    ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,  # type: ignore[attr-defined]
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "dict"): dict,
    ("__builtin__", "list"): list,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name}: CIFAR-10 batch files only "
                            "contain numpy arrays, lists and dicts; this file is not a genuine "
                            "batch (it may be malicious)") from None


def restricted_unpickle(path: Path) -> Any:
    """Unpickle a CIFAR batch file allowing only numpy array reconstruction and plain containers."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({err})") from err


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = restricted_unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry or "labels" not in entry:
        raise DataError(f"{path}: expected a dict with 'data' and 'labels'")
    data, labels = entry["data"], np.asarray(entry["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072), got "
                        f"{getattr(data, 'dtype', type(data))} {getattr(data, 'shape', '')}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) \
            or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path}: 'labels' must be {data.shape[0]} integers in 0..9")
    return data, labels.astype(np.int64)


def load_cifar10(folder: Path) -> ImageDataset:
    """CIFAR-10 from torchvision's `cifar-10-batches-py` folder (data_batch_1..5, test_batch)."""
    def split(names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_cifar_batch(folder / n) for n in names]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)  # rows are R, G, B planes
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = split([f"data_batch_{k}" for k in range(1, 6)])
    test_x, test_y = split(["test_batch"])
    classes = CLASS_NAMES["cifar10"]
    if (folder / "batches.meta").is_file():
        meta = restricted_unpickle(folder / "batches.meta")
        names = meta.get("label_names") if isinstance(meta, dict) else None
        if isinstance(names, list) and len(names) == 10:
            classes = tuple(str(n) for n in names)
    return ImageDataset("cifar10", train_x, train_y, test_x, test_y, classes, source=str(folder))


def _is_cifar_folder(folder: Path) -> bool:
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    return all((folder / n).is_file() for n in names)


# --------------------------------------------------------------------------- synthetic


def make_synthetic(n_train: int, seed: int) -> ImageDataset:
    """Ten classes of 1x28x28 patterns, deterministic from (n_train, seed); test is n_train // 2.

    Each class has a prototype made of a few Gaussian blobs and a bar; a sample is its prototype,
    shifted by up to 3 pixels, scaled in intensity, with a random distractor blob and pixel noise.
    Nearest-class-mean gets about 54 % (chance: 10 %), a two-layer MLP about 90 % after 3 epochs.
    """
    rng = np.random.default_rng([seed, 0x5E7])
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float32)

    def blob(cy: np.ndarray, cx: np.ndarray, s: np.ndarray) -> np.ndarray:  # (K,) each -> (K, 28, 28)
        return np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2)
                      / (2 * s[:, None, None] ** 2))

    protos = np.zeros((10, 28, 28), np.float32)
    for c in range(10):
        k = 3
        protos[c] = blob(rng.uniform(7, 21, k), rng.uniform(7, 21, k), rng.uniform(2.0, 3.5, k)).sum(0)
        # A class-specific stripe texture, so local (convolutional) features tell classes apart too.
        theta, period = c * np.pi / 10, rng.uniform(3.0, 6.0)
        protos[c] *= 0.55 + 0.45 * np.cos(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        angle = rng.uniform(0, np.pi)
        d = np.abs((yy - 14) * np.cos(angle) - (xx - 14) * np.sin(angle))
        protos[c] += 0.8 * np.exp(-d**2 / 2) * (np.hypot(yy - 14, xx - 14) < 9)
    protos /= protos.max(axis=(1, 2), keepdims=True)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.arange(n) % 10  # balanced classes, then shuffled
        rng.shuffle(y)
        img = protos[y] * rng.uniform(0.6, 1.0, (n, 1, 1)).astype(np.float32)
        shifts = rng.integers(-3, 4, size=(n, 2))
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                img[sel] = np.roll(img[sel], (dy, dx), axis=(1, 2))
        img += 0.5 * blob(rng.uniform(4, 24, n), rng.uniform(4, 24, n), rng.uniform(1.5, 3.0, n))
        img += rng.normal(0.0, 0.12, img.shape).astype(np.float32)
        x = np.clip(img * 255.0, 0, 255).round().astype(np.uint8)[:, None]
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_train // 2)
    return ImageDataset("synthetic", train_x, train_y, test_x, test_y, CLASS_NAMES["synthetic"],
                        source=f"synthetic(n_train={n_train}, seed={seed})")


# --------------------------------------------------------------------------- finding and caching


def candidate_dirs(name: str, root: str | None, nmoe_data: str | None, cwd: Path) -> list[Path]:
    """Folders searched for `name`, in order (each place: its dataset subfolder, then itself)."""
    sub = _SUBDIR[name]
    bases = [Path(p) for p in (nmoe_data, str(cwd / "data"), root) if p]
    places: list[Path] = []
    for base in bases:
        places += [base / sub, base]
        if name == "fashion_mnist":
            places.append(base / "FashionMNIST" / "raw")  # torchvision's layout
    places += [Path(p) for p in SYSTEM_DIRS[name]]
    return list(dict.fromkeys(places))


def _missing(name: str, places: list[Path]) -> DataError:
    where = "\n".join(f"  - {p}" for p in places)
    if name == "fashion_mnist":
        files = "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, " \
                "t10k-labels-idx1-ubyte.gz"
        how = ("  - sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu; installs into "
               "/usr/share/datasets/fashion-mnist), or\n"
               f"  - put {files} (gzipped or not) in ./data/fashion-mnist, or\n")
    else:
        how = ("  - extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) so "
               "that ./data/cifar-10-batches-py/data_batch_1 exists, or\n")
    how += ("  - set $NMOE_DATA (or data.root) to a folder holding them, or\n"
            "  - set data.download: true on a machine with internet (torchvision downloads into ./data)")
    return DataError(f"{name} not found. Looked in:\n{where}\nTo get it:\n{how}")


def _download(name: str, cwd: Path) -> Path:
    # Imported here: torchvision.datasets pulls in its download helpers only when asked to.
    import torchvision.datasets as tvd

    target = cwd / "data"
    try:
        if name == "fashion_mnist":
            tvd.FashionMNIST(str(target), train=True, download=True)
            return target / "FashionMNIST" / "raw"
        tvd.CIFAR10(str(target), train=True, download=True)
        return target / "cifar-10-batches-py"
    except (OSError, RuntimeError) as err:
        raise DataError(f"downloading {name} into {target} failed: {err}") from err


_lock = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None, download: bool, nmoe_data: str | None, cwd: str,
                 synthetic_train: int, seed: int) -> ImageDataset:
    if name == "synthetic":
        return make_synthetic(synthetic_train, seed)
    places = candidate_dirs(name, root, nmoe_data, Path(cwd))
    for place in places:
        if name == "fashion_mnist" and _find_idx(place) is not None:
            return load_fashion_mnist(place)
        if name == "cifar10" and _is_cifar_folder(place):
            return load_cifar10(place)
    if not download:
        raise _missing(name, places)
    folder = _download(name, Path(cwd))
    return load_fashion_mnist(folder) if name == "fashion_mnist" else load_cifar10(folder)


def load_dataset(cfg: DataConfig, seed: int = 0) -> ImageDataset:
    """The dataset `cfg` names, loaded once per process (seed matters for synthetic only)."""
    if cfg.name not in DATASET_STATS:
        raise DataError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASET_STATS)}")
    synthetic = cfg.name == "synthetic"
    with _lock:  # agents may load from worker threads; one load, the rest wait for the cache
        return _load_cached(cfg.name, cfg.root, cfg.download, os.environ.get("NMOE_DATA") or None,
                            str(Path.cwd()), cfg.synthetic_train if synthetic else 0,
                            seed if synthetic else 0)


def clear_cache() -> None:
    """Forget every loaded dataset (tests; freeing memory)."""
    _load_cached.cache_clear()
