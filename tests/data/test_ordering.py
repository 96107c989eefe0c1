"""Tests for oanet_jax.data.ordering (which record, flip and scale every position gets)."""

from __future__ import annotations

import pytest

from oanet_jax.data import ordering


def test_train_plan_epochs_hosts_and_determinism():
    n, hosts = 11, 2
    plans = [ordering.TrainPlan(n, 7, h, hosts, (16, 24, 32)) for h in range(hosts)]
    length = plans[0].per_host_epoch
    assert length == 5
    for epoch in range(3):
        per_host = [[p(epoch * length + i)[0] for i in range(length)] for p in plans]
        assert not set(per_host[0]) & set(per_host[1])  # disjoint hosts
        assert len(set(per_host[0] + per_host[1])) == 2 * length  # no repeats in an epoch
        globals_ = [p(epoch * length + i)[3] for p in plans for i in range(length)]
        assert sorted(globals_) == list(range(epoch * 10, epoch * 10 + 10))
    first = [plans[0](i) for i in range(3 * length)]
    assert first == [ordering.TrainPlan(n, 7, 0, hosts, (16, 24, 32))(i) for i in range(15)]
    other = [ordering.TrainPlan(n, 8, 0, hosts, (16, 24, 32))(i) for i in range(15)]
    assert first != other
    epochs = [[first[e * length + i][0] for i in range(length)] for e in range(3)]
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # reshuffled per epoch
    flips = [f for _, f, _, _ in first]
    assert any(flips) and not all(flips)
    assert {s for _, _, s, _ in first} <= {16, 24, 32} and len({s for _, _, s, _ in first}) > 1
    no_flip = ordering.TrainPlan(n, 7, 0, hosts, (16,), random_flip=False)
    assert not any(no_flip(i)[1] for i in range(20))
    with pytest.raises(ValueError):
        ordering.TrainPlan(1, 0, 0, 2, (16,))


def test_eval_indices_hosts():
    idx = [ordering.eval_indices(7, h, 3, 2) for h in range(3)]
    assert [len(i) for i in idx] == [4, 4, 4]  # ceil(ceil(7 / 3) / 2) = 2 batches each
    real = [set(i[i >= 0].tolist()) for i in idx]
    assert set().union(*real) == set(range(7)) and sum(len(r) for r in real) == 7
    assert idx[0].tolist() == [0, 3, 6, -1]


def test_host_ranges_train_and_eval():
    assert ordering.host_ranges(10, 3, training=True) == [(0, 3), (3, 6), (6, 9)]
    assert ordering.host_ranges(10, 3, training=False) == [(0, 4), (4, 7), (7, 10)]
    assert ordering.host_ranges(5, 1, training=False) == [(0, 5)]
