"""Acceptance arithmetic (nld_lora/acceptance.py) against its definitions, counted the slow way."""

import random

import torch

from nld_lora.acceptance import count_cycle, expected_tokens, position_counts, rates
from nld_lora.train.objective import simulated_acceptance


def test_counts_and_rates_follow_the_definition():
    rng = random.Random(0)
    k = 6
    cycles = [rng.choice([0, 0, 1, 2, 3, 6]) for _ in range(300)]
    attempts, accepts = [], []
    for n in cycles:
        count_cycle(attempts, accepts, n, k)
    for j in range(1, k + 1):  # r_j = P(draft j accepted | drafts 1..j-1 accepted)
        reached = [n for n in cycles if n >= j - 1]
        assert attempts[j - 1] == len(reached) and accepts[j - 1] == sum(n >= j for n in reached)
    got = rates(accepts, attempts)
    assert all(r is None or 0 <= r <= 1 for r in got)
    mean_committed = sum(n + 1 for n in cycles) / len(cycles)  # E(k) from rates == mean tokens per cycle
    assert abs(expected_tokens([r or 0.0 for r in got]) - mean_committed) < 1e-9
    valid = torch.ones(len(cycles), k, dtype=torch.bool)
    t_att, t_acc = position_counts(torch.tensor(cycles), valid)
    assert t_att.tolist() == attempts and t_acc.tolist() == accepts
    assert abs(simulated_acceptance(t_att, t_acc) - mean_committed) < 1e-9


def test_short_rows_and_expected_tokens_cutoff():
    valid = torch.tensor([[True, True, False], [True, True, True]])
    att, acc = position_counts(torch.tensor([2, 1]), valid)
    assert att.tolist() == [2, 2, 0] and acc.tolist() == [2, 1, 0]
    assert expected_tokens([0.5, 0.5, 0.5], 2) == 1 + 0.5 + 0.25
    assert expected_tokens([], 4) == 1.0
