"""Datasets: Fashion-MNIST IDX files, CIFAR-10 pickles (restricted), synthetic, normalization."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe.errors import DataError
from nmoe_models import data
from nmoe_models.config import DataConfig
from nmoe_models.data import (
    DATASET_STATS,
    clear_cache,
    dataset_info,
    load_dataset,
    make_synthetic,
    read_idx,
    restricted_unpickle,
    to_float,
)

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No $NMOE_DATA, cwd in a fresh folder, and a fresh cache, so tests see only what they set up."""
    monkeypatch.delenv("NMOE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    clear_cache()
    yield
    clear_cache()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    magic = {1: 0x801, 3: 0x803}[array.ndim]
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def fake_fmnist(folder: Path, gz: bool, n_train: int = 30, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(),
                    reason="Debian's Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_loads_from_the_debian_folder_quickly():
    start = time.perf_counter()
    ds = load_dataset(DataConfig(name="fashion_mnist"))
    elapsed = time.perf_counter() - start

    assert ds.source == str(DEBIAN_FMNIST)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 1000))
    assert elapsed < 5.0, f"loading took {elapsed:.2f} s"
    assert load_dataset(DataConfig(name="fashion_mnist")) is ds  # cached: clients share one copy


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["fashion-mnist", "FashionMNIST/raw", "."])
def test_fashion_mnist_layouts_under_nmoe_data(tmp_path, monkeypatch, gz, layout):
    arrays = fake_fmnist(tmp_path / "store" / layout, gz)
    monkeypatch.setenv("NMOE_DATA", str(tmp_path / "store"))

    ds = load_dataset(DataConfig(name="fashion_mnist"))

    assert ds.train_x.shape == (30, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_nmoe_data_is_searched_before_the_configured_root(tmp_path, monkeypatch):
    fake_fmnist(tmp_path / "env", gz=True, n_train=10)
    fake_fmnist(tmp_path / "root", gz=True, n_train=40)
    monkeypatch.setenv("NMOE_DATA", str(tmp_path / "env"))

    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path / "root")))

    assert len(ds.train_x) == 10


def test_idx_with_a_wrong_magic_or_size_is_rejected(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes((0x803).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataError, match="magic"):
        read_idx(path, ndim=1)
    path.write_bytes((0x801).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataError, match="truncated"):
        read_idx(path, ndim=1)


def test_missing_dataset_names_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", (str(tmp_path / "system"),))
    monkeypatch.setenv("NMOE_DATA", str(tmp_path / "env"))
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path / "configured"))

    with pytest.raises(DataError) as err:
        load_dataset(cfg)

    msg = str(err.value)
    for place in ("env/fashion-mnist", "env", "data/fashion-mnist", "configured/fashion-mnist", "system"):
        assert str(tmp_path / place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "$NMOE_DATA" in msg and "download: true" in msg


# --------------------------------------------------------------------------- CIFAR-10


def _py2str(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b  # SHORT_BINSTRING: a Python 2 str


def py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes Python 2's cPickle wrote for the real CIFAR-10 batches: protocol 2, str keys,
    numpy.core.multiarray._reconstruct, and the pixels as one Python 2 str."""
    out = b"\x80\x02}q\x00(" + _py2str(b"data")  # PROTO 2, EMPTY_DICT, BINPUT, MARK
    out += b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85"
    out += _py2str(b"b") + b"\x87R"
    out += b"(K\x01J" + struct.pack("<i", data.shape[0]) + b"M\x00\x0c\x86"  # version, shape
    out += b"cnumpy\ndtype\n" + _py2str(b"u1") + b"K\x00K\x01\x87R(K\x03" + _py2str(b"|")
    out += b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state, BUILD
    raw = data.tobytes()
    out += b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"  # NEWFALSE, BINSTRING, TUPLE, BUILD
    out += _py2str(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return out + b"u."  # SETITEMS, STOP


def write_cifar(folder: Path, per_batch: int, protocol: int | str) -> tuple[np.ndarray, np.ndarray]:
    """A tiny CIFAR-10 in torchvision's layout: the same files and dict keys as the real python
    batches, pickled by Python 3 with `protocol`, or byte for byte as Python 2 did ('py2')."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    rows, labels = [], []
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batch = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        entry = {"batch_label": f"{name} of 5", "labels": y, "data": batch,
                 "filenames": [f"img_{i}.png" for i in range(per_batch)]}
        if protocol == "py2":
            (folder / name).write_bytes(py2_batch(batch, y))
        else:
            (folder / name).write_bytes(pickle.dumps(entry, protocol=int(protocol)))
        rows.append(batch)
        labels.append(y)
    meta = {"num_cases_per_batch": per_batch, "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]}
    meta_protocol = 2 if protocol == "py2" else int(protocol)
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=meta_protocol))
    return np.concatenate(rows), np.concatenate(labels)


@pytest.mark.parametrize("protocol", ["py2", 2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_in_torchvision_format_loads(tmp_path, protocol):
    rows, labels = write_cifar(tmp_path / "cifar-10-batches-py", per_batch=4, protocol=protocol)

    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))

    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    # Rows hold the red plane, then green, then blue, each row-major.
    assert ds.train_x[0, 0, 0, 0] == rows[0, 0] and ds.train_x[0, 1, 0, 0] == rows[0, 1024]
    assert ds.train_x[0, 2, 31, 31] == rows[0, 3071]
    assert np.array_equal(ds.train_y.numpy(), labels[:20]) and np.array_equal(ds.test_y.numpy(), labels[20:])
    assert ds.classes[9] == "truck"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_cifar_pickle_is_refused(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=2, protocol=2)
    evil = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": _Exploit()}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil))

    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert not (tmp_path / "pwned").exists()


def test_restricted_unpickler_rejects_any_other_global(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"f": Path("x")}))
    with pytest.raises(DataError, match="pathlib"):
        restricted_unpickle(path)


def test_missing_cifar_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nowhere")))
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert str(tmp_path / "data" / "cifar-10-batches-py") in msg
    assert "download: true" in msg


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_seed():
    a, b, c = make_synthetic(200, seed=3), make_synthetic(200, seed=3), make_synthetic(200, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (200, 1, 28, 28) and a.test_x.shape == (100, 1, 28, 28)
    assert torch.equal(torch.bincount(a.train_y), torch.full((10,), 20))


def test_synthetic_is_learnable_by_nearest_class_mean():
    ds = load_dataset(DataConfig(name="synthetic", synthetic_train=2000), seed=0)
    x = to_float(ds.train_x, "synthetic").flatten(1)
    xt = to_float(ds.test_x, "synthetic").flatten(1)
    means = torch.stack([x[ds.train_y == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(xt, means).argmin(1) == ds.test_y).float().mean().item()
    assert accuracy > 0.4, accuracy  # chance is 0.1


def test_synthetic_statistics_match_the_normalization_constants():
    x = make_synthetic(6000, seed=0).train_x.float() / 255
    (mean,), (std,) = DATASET_STATS["synthetic"]
    assert abs(x.mean().item() - mean) < 0.01 and abs(x.std().item() - std) < 0.01


# --------------------------------------------------------------------------- normalization


def test_to_float_normalizes_per_channel_and_keeps_channels_last():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in DATASET_STATS["cifar10"])

    out = to_float(x, "cifar10")

    assert out.dtype == torch.float32
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_to_float_rejects_wrong_channel_count_and_dtype():
    with pytest.raises(DataError, match="channel"):
        to_float(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "fashion_mnist")
    with pytest.raises(DataError, match="uint8"):
        to_float(torch.zeros(1, 1, 4, 4), "fashion_mnist")


def test_dataset_info():
    info = dataset_info("cifar10")
    assert (info.channels, info.size, info.classes) == (3, 32, 10)
    with pytest.raises(DataError):
        dataset_info("imagenet")


def test_a_gzipped_dataset_is_decompressed_once_and_mapped_copy_on_write(tmp_path, monkeypatch):
    # Prepare: gzipped files, an empty data cache
    arrays = fake_fmnist(tmp_path / "store" / "fashion-mnist", gz=True)
    monkeypatch.setenv("NMOE_DATA", str(tmp_path / "store"))
    monkeypatch.setenv("NMOE_DATA_CACHE", str(tmp_path / "cache"))
    data.clear_cache()
    # Execute: load, forget, load again
    first = load_dataset(DataConfig(name="fashion_mnist"))
    copies = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    data.clear_cache()
    second = load_dataset(DataConfig(name="fashion_mnist"))
    second.train_x[0, 0, 0, 0] = 255 - second.train_x[0, 0, 0, 0]  # a write stays in this process
    data.clear_cache()
    third = load_dataset(DataConfig(name="fashion_mnist"))
    # Assert: four uncompressed copies, made once; the same images; the file untouched by the write
    assert len(copies) == 4 and not any(p.name.endswith(".tmp") for p in copies)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == copies
    assert np.array_equal(first.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(third.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    data.clear_cache()
