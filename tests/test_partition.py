"""Partitions: exact class counts, disjointness, determinism, per-client locality, impossible requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmoe.errors import DataError
from nmoe_models.config import DataConfig, ExperimentConfig, PartitionConfig
from nmoe_models.partition import (
    ClientData,
    all_client_indices,
    client_class_counts,
    client_indices,
    iid_counts,
    load_client_data,
    load_union,
    noniid_counts,
    partition_counts,
)

C = 10


def labels(per_class: int, seed: int = 0) -> np.ndarray:
    """A shuffled label vector with `per_class` samples of each of C classes."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(C), per_class))


# Fashion-MNIST's class sizes: 6000 per class in train, 1000 in test.
TRAIN, TEST = labels(6000, 1), labels(1000, 2)


@pytest.mark.parametrize("tau", [0.9, 0.5, 0.2, 0.1, 0.0, 1.0])
@pytest.mark.parametrize("n", [1000, 37, 9])
@pytest.mark.parametrize("client", [0, 3, 12])
def test_noniid_dominant_class_and_equal_shares(tau, n, client):
    counts = noniid_counts(n, C, client, tau)

    d = client % C
    assert counts.sum() == n
    assert counts[d] == round((1 - tau) * n)
    others = np.delete(counts, d)
    assert others.max() - others.min() <= 1


def test_noniid_paper_numbers():
    counts = noniid_counts(1000, C, 3, 0.2)
    assert counts[3] == 800 and sorted(np.delete(counts, 3).tolist()) == [22] * 7 + [23] * 2


@pytest.mark.parametrize("n", [1000, 1005, 3])
def test_iid_is_uniform(n):
    for client in range(12):
        counts = iid_counts(n, C, client)
        assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_dirichlet_counts_are_seeded_per_client():
    part = PartitionConfig(kind="dirichlet", beta=0.3)
    a = client_class_counts(part, 500, C, client_id=1, seed=7)
    assert a.sum() == 500
    assert np.array_equal(a, client_class_counts(part, 500, C, client_id=1, seed=7))
    assert not np.array_equal(a, client_class_counts(part, 500, C, client_id=2, seed=7))
    assert not np.array_equal(a, client_class_counts(part, 500, C, client_id=1, seed=8))


def test_remainders_balance_class_totals_over_ten_clients():
    counts = partition_counts(PartitionConfig(kind="noniid", tau=0.2, unlabeled_per_client=4000), 10, C, 0)
    assert (counts.test.sum(0) == 1000).all()  # exactly Fashion-MNIST's / CIFAR-10's test set
    assert ((counts.train + counts.unlabeled).sum(0) == 5000).all()  # exactly CIFAR-10's train set


PAPER = PartitionConfig(kind="noniid", tau=0.2, train_per_client=1000, test_per_client=1000,
                        unlabeled_per_client=4000)


@pytest.mark.parametrize("part", [
    PAPER,
    PartitionConfig(kind="iid", unlabeled_per_client=500),
    PartitionConfig(kind="noniid", tau=0.5, test_distribution="iid", unlabeled_per_client=300),
    PartitionConfig(kind="dirichlet", beta=0.5, train_per_client=300, test_per_client=200,
                    unlabeled_per_client=100),
])
def test_clients_are_disjoint_and_hold_their_counts(part):
    every = all_client_indices(TRAIN, TEST, part, clients=10, seed=0, num_classes=C)
    counts = partition_counts(part, 10, C, 0)

    train_side = np.concatenate([np.concatenate([i.train, i.unlabeled]) for i in every])
    test_side = np.concatenate([i.test for i in every])
    assert len(np.unique(train_side)) == len(train_side)  # labeled and unlabeled, all clients
    assert len(np.unique(test_side)) == len(test_side)
    for k, idx in enumerate(every):
        assert np.array_equal(np.bincount(TRAIN[idx.train], minlength=C), counts.train[k])
        assert np.array_equal(np.bincount(TRAIN[idx.unlabeled], minlength=C), counts.unlabeled[k])
        assert np.array_equal(np.bincount(TEST[idx.test], minlength=C), counts.test[k])


def test_unlabeled_and_same_test_follow_the_labeled_proportions():
    idx = client_indices(TRAIN, TEST, PAPER, clients=10, seed=0, client_id=4, num_classes=C)
    assert np.bincount(TRAIN[idx.unlabeled], minlength=C)[4] == 3200  # round(0.8 * 4000)
    assert np.bincount(TEST[idx.test], minlength=C)[4] == 800


def test_iid_test_setup_b_is_uniform():
    part = PartitionConfig(kind="noniid", tau=0.1, test_distribution="iid")
    idx = client_indices(TRAIN, TEST, part, clients=10, seed=0, client_id=2, num_classes=C)
    assert (np.bincount(TEST[idx.test], minlength=C) == 100).all()
    assert np.bincount(TRAIN[idx.train], minlength=C)[2] == 900


def test_one_client_alone_equals_its_slice_of_all_clients():
    every = all_client_indices(TRAIN, TEST, PAPER, clients=10, seed=5, num_classes=C)
    for k in (0, 6, 9):
        alone = client_indices(TRAIN, TEST, PAPER, clients=10, seed=5, client_id=k, num_classes=C)
        for split in ("train", "unlabeled", "test"):
            assert np.array_equal(getattr(alone, split), getattr(every[k], split))


def test_indices_are_deterministic_per_seed():
    a = client_indices(TRAIN, TEST, PAPER, clients=10, seed=1, client_id=3, num_classes=C)
    b = client_indices(TRAIN, TEST, PAPER, clients=10, seed=1, client_id=3, num_classes=C)
    c = client_indices(TRAIN, TEST, PAPER, clients=10, seed=2, client_id=3, num_classes=C)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.test, b.test)
    assert not np.array_equal(np.sort(a.train), np.sort(c.train))
    assert not np.array_equal(np.sort(a.test), np.sort(c.test))


def test_impossible_request_names_class_split_and_numbers():
    part = PartitionConfig(kind="noniid", tau=0.2, test_per_client=1000)
    with pytest.raises(DataError) as err:  # 11 clients: clients 0 and 10 are both dominated by class 0
        client_indices(TRAIN, TEST, part, clients=11, seed=0, client_id=5, num_classes=C,
                       dataset="fashion_mnist", classes=[f"c{i}" for i in range(C)])
    msg = str(err.value)
    assert "class 0 (c0)" in msg and "test split" in msg
    assert "1800" in msg and "1000" in msg and "test_per_client" in msg


def test_impossible_train_request_counts_unlabeled_too():
    part = PartitionConfig(kind="iid", train_per_client=1000, unlabeled_per_client=6000)
    with pytest.raises(DataError, match="train split.*unlabeled_per_client"):
        client_indices(TRAIN, TEST, part, clients=10, seed=0, client_id=0, num_classes=C)


def test_client_id_out_of_range():
    with pytest.raises(DataError, match="client id"):
        client_indices(TRAIN, TEST, PAPER, clients=10, seed=0, client_id=10, num_classes=C)


# --------------------------------------------------------------------------- ClientData


def small_experiment(**part) -> ExperimentConfig:
    return ExperimentConfig(
        seed=3, clients=4, data=DataConfig(name="synthetic", synthetic_train=2000),
        partition=PartitionConfig(**{"kind": "noniid", "tau": 0.4, "train_per_client": 100,
                                     "test_per_client": 50, "unlabeled_per_client": 60, **part}))


def test_load_client_data_gives_one_clients_share():
    exp = small_experiment()
    cd = load_client_data(exp, 2)

    assert isinstance(cd, ClientData) and cd.client_id == 2 and cd.dataset == "synthetic"
    assert cd.train_x.shape == (100, 1, 28, 28) and cd.train_x.dtype == torch.uint8
    assert cd.test_x.shape == (50, 1, 28, 28) and cd.unlabeled_x.shape == (60, 1, 28, 28)
    assert cd.train_class_counts()[2] == 60 and cd.test_class_counts()[2] == 30
    assert not hasattr(cd, "unlabeled_y")
    assert cd.num_train == 100 and cd.image_shape == (1, 28, 28)


def test_load_union_is_all_clients_concatenated():
    exp = small_experiment()
    union = load_union(exp)
    parts = [load_client_data(exp, k) for k in range(exp.clients)]

    assert union.client_id == -1
    assert torch.equal(union.train_x, torch.cat([p.train_x for p in parts]))
    assert torch.equal(union.train_y, torch.cat([p.train_y for p in parts]))
    assert torch.equal(union.test_y, torch.cat([p.test_y for p in parts]))
    assert union.unlabeled_x.shape[0] == 4 * 60
