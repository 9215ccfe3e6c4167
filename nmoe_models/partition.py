"""Splitting a dataset across clients: pure functions of (labels, config, seed, client id).

How a partition is built, so that every client can compute its own share alone:

1. Per-client class counts (K clients x C classes) for the labeled train set, the unlabeled pool and
   the test set follow from the config alone (IID, the paper's non-IID(tau), or Dirichlet(beta)
   proportions drawn from (seed, client id)). They are cheap, so every client computes everyone's.
2. Each split's samples of class c are permuted once by a seed shared by all clients.
3. Client i takes, for each class, the next block of that permutation after clients 0..i-1; the
   unlabeled pool comes from the train split after every client's labeled block. Blocks never
   overlap, so clients are disjoint in train, unlabeled and test, and no client needs another's data.

Remainders are spread starting just after the client's dominant class, so with K = C clients every
class is asked for the same total (the paper's 10 clients x 1000 test samples use Fashion-MNIST's or
CIFAR-10's whole test set, 1000 per class, in IID and non-IID(tau) alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nmoe.errors import DataError

from .config import ExperimentConfig, PartitionConfig
from .data import ImageDataset, load_dataset

__all__ = [
    "ClientData",
    "ClientIndices",
    "PartitionCounts",
    "apportion",
    "class_counts",
    "client_class_counts",
    "client_indices",
    "all_client_indices",
    "dirichlet_proportions",
    "iid_counts",
    "load_client_data",
    "load_union",
    "noniid_counts",
    "partition_counts",
]

# Stream tags mixed into the seed so that the draws of different purposes are independent.
_TAG_PERM, _TAG_DIRICHLET, _TAG_ORDER = 0x5EED1, 0x5EED2, 0x5EED3
_SPLITS = {"train": 0, "test": 1}


# --------------------------------------------------------------------------- class counts


def _spread(total: int, order: Sequence[int], num_classes: int) -> np.ndarray:
    """`total` shared as equally as possible over the classes in `order`; extras to the first ones."""
    counts = np.zeros(num_classes, dtype=np.int64)
    if not order:
        return counts
    base, extra = divmod(total, len(order))
    counts[list(order)] = base
    counts[list(order[:extra])] += 1
    return counts


def iid_counts(n: int, num_classes: int, client_id: int) -> np.ndarray:
    """Uniform classes; the n mod C extra samples go to classes client_id, client_id + 1, ..."""
    return _spread(n, [(client_id + k) % num_classes for k in range(num_classes)], num_classes)


def noniid_counts(n: int, num_classes: int, client_id: int, tau: float) -> np.ndarray:
    """The paper's non-IID(tau): class client_id mod C holds round((1 - tau) n), the rest share tau.

    The other C - 1 classes get equal shares; the remainder goes to the classes right after the
    dominant one (d + 1, d + 2, ...), which balances the per-class totals across clients.
    """
    d = client_id % num_classes
    dominant = min(n, round((1.0 - tau) * n))
    others = [(d + k) % num_classes for k in range(1, num_classes)]
    counts = _spread(n - dominant, others, num_classes)
    counts[d] += dominant if others else n
    return counts


def dirichlet_proportions(num_classes: int, client_id: int, beta: float, seed: int) -> np.ndarray:
    """Client `client_id`'s label proportions ~ Dirichlet(beta, ..., beta), drawn from (seed, id)."""
    rng = np.random.default_rng([seed, _TAG_DIRICHLET, client_id])
    return rng.dirichlet(np.full(num_classes, beta))


def apportion(n: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to n closest to n * proportions (largest remainder, ties by class)."""
    raw = n * np.asarray(proportions, dtype=np.float64) / float(np.sum(proportions))
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: n - int(counts.sum())]] += 1
    return counts


def client_class_counts(part: PartitionConfig, n: int, num_classes: int, client_id: int,
                        seed: int, *, uniform: bool = False) -> np.ndarray:
    """Per-class counts (C,) of n samples for one client; `uniform` forces IID (test setup b)."""
    if uniform or part.kind == "iid":
        return iid_counts(n, num_classes, client_id)
    if part.kind == "noniid":
        return noniid_counts(n, num_classes, client_id, part.tau)
    return apportion(n, dirichlet_proportions(num_classes, client_id, part.beta, seed))


@dataclass(frozen=True)
class PartitionCounts:
    """Samples per (client, class) of each part of a partition, int64 arrays (K, C)."""

    train: np.ndarray
    """Labeled training samples."""
    unlabeled: np.ndarray
    """Unlabeled pool (from the train split, same proportions as the labeled samples)."""
    test: np.ndarray
    """Test samples (from the test split)."""


def partition_counts(part: PartitionConfig, clients: int, num_classes: int, seed: int) -> PartitionCounts:
    """Every client's class counts; cheap and data-free, so usable to describe a partition."""
    def table(n: int, uniform: bool = False) -> np.ndarray:
        rows = [client_class_counts(part, n, num_classes, i, seed, uniform=uniform) for i in range(clients)]
        return np.stack(rows).reshape(clients, num_classes)

    return PartitionCounts(train=table(part.train_per_client),
                           unlabeled=table(part.unlabeled_per_client),
                           test=table(part.test_per_client, uniform=part.test_distribution == "iid"))


def class_counts(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """Samples per class, int64 (C,)."""
    y = torch.as_tensor(labels, dtype=torch.int64)
    return torch.bincount(y, minlength=num_classes)


# --------------------------------------------------------------------------- indices


@dataclass(frozen=True)
class ClientIndices:
    """One client's share as int64 indices into the dataset's train and test splits."""

    train: np.ndarray
    """Labeled samples (train split)."""
    unlabeled: np.ndarray
    """Unlabeled pool (train split), disjoint from every client's labeled samples."""
    test: np.ndarray
    """Test samples (test split)."""


def _class_perms(labels: np.ndarray, num_classes: int, seed: int, split: str) -> list[np.ndarray]:
    """Each class's sample indices in a seeded order shared by all clients."""
    return [np.random.default_rng([seed, _TAG_PERM, _SPLITS[split], c]).permutation(
                np.flatnonzero(labels == c)) for c in range(num_classes)]


def _check_capacity(needed: np.ndarray, labels: np.ndarray, num_classes: int, split: str,
                    dataset: str, classes: Sequence[str] | None, hint: str) -> None:
    available = np.bincount(labels, minlength=num_classes)
    for c in range(num_classes):
        if needed[c] > available[c]:
            name = f" ({classes[c]})" if classes else ""
            raise DataError(f"partition: class {c}{name} of the {dataset} {split} split: the clients need "
                            f"{int(needed[c])} samples, the split has {int(available[c])}. {hint}")


def _blocks(perms: list[np.ndarray], start: np.ndarray, count: np.ndarray) -> np.ndarray:
    parts = [perms[c][start[c]: start[c] + count[c]] for c in range(len(perms))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _shuffled(idx: np.ndarray, seed: int, client_id: int, part: int) -> np.ndarray:
    # Blocks come out class by class; a seeded shuffle keeps "the first k samples" class-mixed.
    return np.random.default_rng([seed, _TAG_ORDER, client_id, part]).permutation(idx)


def _indices(counts: PartitionCounts, train_perms: list[np.ndarray], test_perms: list[np.ndarray],
             seed: int, client_id: int) -> ClientIndices:
    before = slice(0, client_id)
    train_start = counts.train[before].sum(0)
    unl_start = counts.train.sum(0) + counts.unlabeled[before].sum(0)
    test_start = counts.test[before].sum(0)
    return ClientIndices(
        train=_shuffled(_blocks(train_perms, train_start, counts.train[client_id]), seed, client_id, 0),
        unlabeled=_shuffled(_blocks(train_perms, unl_start, counts.unlabeled[client_id]), seed, client_id, 1),
        test=_shuffled(_blocks(test_perms, test_start, counts.test[client_id]), seed, client_id, 2),
    )


def _prepare(train_labels: np.ndarray, test_labels: np.ndarray, part: PartitionConfig, clients: int,
             seed: int, num_classes: int, dataset: str, classes: Sequence[str] | None
             ) -> tuple[PartitionCounts, list[np.ndarray], list[np.ndarray]]:
    counts = partition_counts(part, clients, num_classes, seed)
    _check_capacity(counts.train.sum(0) + counts.unlabeled.sum(0), train_labels, num_classes, "train",
                    dataset, classes, f"Lower partition.train_per_client ({part.train_per_client}) or "
                    f"partition.unlabeled_per_client ({part.unlabeled_per_client}), use fewer clients "
                    f"({clients}), or spread the classes more (larger tau or beta).")
    iid_would_fit = part.test_distribution != "iid" and counts.test.sum() <= len(test_labels)
    _check_capacity(counts.test.sum(0), test_labels, num_classes, "test", dataset, classes,
                    f"Lower partition.test_per_client ({part.test_per_client}) or use fewer clients "
                    f"({clients})" + (", or set partition.test_distribution: iid." if iid_would_fit else "."))
    return (counts, _class_perms(train_labels, num_classes, seed, "train"),
            _class_perms(test_labels, num_classes, seed, "test"))


def client_indices(train_labels: np.ndarray, test_labels: np.ndarray, part: PartitionConfig,
                   clients: int, seed: int, client_id: int, num_classes: int,
                   dataset: str = "dataset", classes: Sequence[str] | None = None) -> ClientIndices:
    """Client `client_id`'s indices; uses the other clients' counts, never their samples.

    Raises DataError when the clients together ask more of some class than a split holds.
    """
    if not 0 <= client_id < clients:
        raise DataError(f"client id {client_id} outside 0..{clients - 1}")
    counts, train_perms, test_perms = _prepare(np.asarray(train_labels), np.asarray(test_labels), part,
                                               clients, seed, num_classes, dataset, classes)
    return _indices(counts, train_perms, test_perms, seed, client_id)


def all_client_indices(train_labels: np.ndarray, test_labels: np.ndarray, part: PartitionConfig,
                       clients: int, seed: int, num_classes: int, dataset: str = "dataset",
                       classes: Sequence[str] | None = None) -> list[ClientIndices]:
    """Every client's indices (same as client_indices for each id, permutations computed once)."""
    counts, train_perms, test_perms = _prepare(np.asarray(train_labels), np.asarray(test_labels), part,
                                               clients, seed, num_classes, dataset, classes)
    return [_indices(counts, train_perms, test_perms, seed, i) for i in range(clients)]


# --------------------------------------------------------------------------- client data


@dataclass(frozen=True)
class ClientData:
    """What one client holds. Images uint8 (N, C, H, W), labels int64 (N,).

    The unlabeled pool has no labels here on purpose: training code must not be able to use them.
    """

    client_id: int
    """The client, or -1 for load_union's union of all clients."""
    dataset: str
    """Dataset name (selects the normalization in data.to_float and the augmentation recipe)."""
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    unlabeled_x: torch.Tensor
    """Unlabeled images (0 rows unless partition.unlabeled_per_client > 0)."""

    def __post_init__(self) -> None:
        assert self.train_x.dtype == torch.uint8 and self.train_x.ndim == 4
        assert self.train_y.shape == (self.train_x.shape[0],) and self.train_y.dtype == torch.int64
        assert self.test_y.shape == (self.test_x.shape[0],) and self.test_y.dtype == torch.int64
        assert self.test_x.shape[1:] == self.train_x.shape[1:] == self.unlabeled_x.shape[1:]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)

    @property
    def num_train(self) -> int:
        """Labeled training samples (FedAvg's weight n_i)."""
        return int(self.train_x.shape[0])

    def train_class_counts(self) -> torch.Tensor:
        return class_counts(self.train_y, self.num_classes)

    def test_class_counts(self) -> torch.Tensor:
        return class_counts(self.test_y, self.num_classes)


def _client_data(client_id: int, idx: ClientIndices, ds_name: str,
                 num_classes: int, split_tensors: tuple[torch.Tensor, ...]) -> ClientData:
    train_x, train_y, test_x, test_y = split_tensors
    tr, un, te = (torch.from_numpy(a) for a in (idx.train, idx.unlabeled, idx.test))
    return ClientData(client_id, ds_name, num_classes, train_x[tr], train_y[tr], test_x[te], test_y[te],
                      train_x[un])


_Prepared = tuple[PartitionCounts, list[np.ndarray], list[np.ndarray]]
_PREPARED: dict[tuple[int, PartitionConfig, int, int], tuple[object, _Prepared]] = {}


def _prepared(ds: ImageDataset, part: PartitionConfig, clients: int, seed: int) -> _Prepared:
    """``_prepare`` for a dataset ``load_dataset`` cached, remembered per process: every client's
    counts and the class permutations cost O(clients) each, so 1000 agents of one process would
    spend O(clients^2) recomputing them (90 ms per agent at 1000 clients)."""
    key = (id(ds), part, clients, seed)
    hit = _PREPARED.get(key)
    if hit is not None and hit[0] is ds:  # the dataset itself is kept with it: its id is not reused
        return hit[1]
    prepared = _prepare(ds.train_y.numpy(), ds.test_y.numpy(), part, clients, seed, ds.num_classes, ds.name,
                        ds.classes)
    if len(_PREPARED) >= 4:
        _PREPARED.clear()
    _PREPARED[key] = (ds, prepared)
    return prepared


def load_client_data(exp: ExperimentConfig, client_id: int) -> ClientData:
    """Client `client_id`'s share of the experiment's dataset, deterministic from (seed, id)."""
    ds = load_dataset(exp.data, exp.seed)
    if not 0 <= client_id < exp.clients:
        raise DataError(f"client id {client_id} outside 0..{exp.clients - 1}")
    counts, train_perms, test_perms = _prepared(ds, exp.partition, exp.clients, exp.seed)
    idx = _indices(counts, train_perms, test_perms, exp.seed, client_id)
    return _client_data(client_id, idx, ds.name, ds.num_classes,
                        (ds.train_x, ds.train_y, ds.test_x, ds.test_y))


def load_union(exp: ExperimentConfig) -> ClientData:
    """All clients' data in one (client_id -1), client by client: the centralized baseline's view."""
    ds = load_dataset(exp.data, exp.seed)
    every = all_client_indices(ds.train_y.numpy(), ds.test_y.numpy(), exp.partition, exp.clients,
                               exp.seed, ds.num_classes, ds.name, ds.classes)
    union = ClientIndices(*(np.concatenate([getattr(i, f) for i in every]) for f in
                            ("train", "unlabeled", "test")))
    return _client_data(-1, union, ds.name, ds.num_classes,
                        (ds.train_x, ds.train_y, ds.test_x, ds.test_y))
