"""Mechanics of the built-in strategies' parts: EWC's Fisher, the quadratic regulariser, the
reservoir buffer, the strategies' hooks."""

from __future__ import annotations

import torch
from torch import nn

from clbench.buffers import ReservoirBuffer
from clbench.models import Classifier
from clbench.regularizers import QuadraticRegularizer, batch_fisher, per_sample_fisher
from clbench.strategy import masked_cross_entropy


def tiny_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh()), 5, 4)


def batches(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 3, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    allowed = torch.tensor([True, True, True, False]).expand(n, 4)  # class 3 not seen yet
    return [(x[:4], y[:4], allowed[:4]), (x[4:], y[4:], allowed[4:])]


def test_per_sample_fisher_matches_brute_force():
    model = tiny_model()
    params = dict(model.named_parameters())
    fisher = per_sample_fisher(model, params, batches())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    samples = [(x[i], y[i], a[i]) for x, y, a in batches() for i in range(len(y))]
    for x, y, allowed in samples:  # one backward per sample, log-softmax over seen classes only
        model.zero_grad()
        logp = torch.log_softmax(model(x[None]).masked_fill(~allowed, float("-inf")), 1)
        (-logp[0, y]).backward()
        for n, p in params.items():
            expected[n] += p.grad.pow(2) / len(samples)
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-5, atol=1e-7)
    assert fisher["head.weight"][3].abs().sum() == 0  # the masked class gets no importance


def test_batch_fisher_is_the_released_codes_squared_minibatch_gradient():
    model = tiny_model()
    params = dict(model.named_parameters())
    fisher = batch_fisher(model, params, batches(), masked_cross_entropy)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y, allowed in batches():
        assert allowed[:, :3].all() and not allowed[:, 3].any()
        model.zero_grad()
        # by hand, not with the module's helper: cross-entropy over the 3 seen classes only
        torch.nn.functional.cross_entropy(model(x)[:, :3], y).backward()
        for n, p in params.items():
            expected[n] += p.grad.pow(2) * len(y) / 2
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n])


def test_regulariser_is_zero_at_its_anchor_and_quadratic_around_it():
    model = tiny_model()
    params = dict(model.named_parameters())
    reg = QuadraticRegularizer(params)
    assert not reg.active and reg.penalty().item() == 0.0
    importance = {n: torch.rand_like(p) for n, p in params.items()}
    reg.consolidate(importance)
    assert reg.penalty().item() == 0.0
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)
    expected = sum((importance[n] * 0.01).sum() for n in params)
    torch.testing.assert_close(reg.penalty(), expected)
    reg.penalty().backward()
    for n, p in params.items():  # d/dtheta Omega (theta - theta*)^2 = 2 Omega (theta - theta*)
        torch.testing.assert_close(p.grad, 2 * importance[n] * 0.1)


def test_online_accumulation_and_l2_importance():
    p = nn.Parameter(torch.zeros(3))
    reg = QuadraticRegularizer({"p": p}, gamma=0.5)
    reg.consolidate({"p": torch.ones(3)})
    reg.consolidate({"p": torch.full((3,), 2.0)})
    torch.testing.assert_close(reg.importance["p"], torch.full((3,), 2.5))  # 0.5 * 1 + 2
    l2 = QuadraticRegularizer({"p": p})
    l2.consolidate()
    l2.consolidate()
    torch.testing.assert_close(l2.importance["p"], torch.ones(3))  # L2: importance stays 1


def sequential_reservoir(capacity: int, n: int, draws: torch.Tensor) -> list[int]:
    """The textbook one-at-a-time reservoir with the same random draws."""
    slots = [-1] * capacity
    for i in range(n):
        if i < capacity:
            slots[i] = i
        else:
            r = int(draws[i] * (i + 1))
            if r < capacity:
                slots[r] = i
    return slots


def test_reservoir_batch_insert_equals_one_at_a_time():
    buf = ReservoirBuffer(7, seed=3)
    draws = torch.rand(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for start in range(0, 50, 10):  # batches of 10 with duplicates among the chosen slots
        ids = torch.arange(start, start + 10)
        buf.add(id=ids)
    assert buf.data["id"].tolist() == sequential_reservoir(7, 50, draws)
    assert len(buf) == 7 and buf.n_seen == 50


def test_reservoir_keeps_every_sample_with_equal_probability():
    counts = torch.zeros(200)
    for seed in range(300):
        buf = ReservoirBuffer(20, seed=seed)
        for start in range(0, 200, 25):
            buf.add(id=torch.arange(start, start + 25))
        counts[buf.data["id"]] += 1
    freq = counts / 300  # expected 20 / 200 = 0.1 for every sample
    assert abs(freq.mean().item() - 0.1) < 1e-6  # always exactly 20 kept
    assert abs(freq[:100].mean() - freq[100:].mean()) < 0.02  # early samples are not favoured (std ~0.002)
    assert 0.03 < freq.min() and freq.max() < 0.2  # no sample far from 0.1 (std 0.017 each)


def test_reservoir_sample_and_state_round_trip():
    buf = ReservoirBuffer(5, seed=0)
    buf.add(x=torch.arange(3).view(3, 1), y=torch.tensor([7, 8, 9]))
    s = buf.sample(10)
    assert sorted(s["y"].tolist()) == [7, 8, 9]  # fewer stored than asked: all, no repeats
    other = ReservoirBuffer(5, seed=99)
    other.load_state_dict(buf.state_dict())
    assert other.sample(2)["y"].tolist() == buf.sample(2)["y"].tolist()
