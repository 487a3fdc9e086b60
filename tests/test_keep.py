"""The keep budget (`reformer.keep`): the latest layers keep, attention before feed-forward outputs."""

from __future__ import annotations

import torch

from reformer.keep import KeepBudget, KeptOutput


class Holder:
    def __init__(self):
        self.given_up = False

    def give_up(self):
        self.given_up = True


def test_an_attention_evicts_outputs_first_and_an_output_never_evicts_an_attention():
    budget = KeepBudget(limit=100)
    first, second = Holder(), Holder()
    assert budget.take(first, 40)
    out_a, out_b = Holder(), Holder()
    assert budget.take_output(out_a, 30) and budget.take_output(out_b, 30)
    assert budget.kept == [40] and budget.kept_outputs == [30, 30]
    assert not budget.take_output(Holder(), 61)  # more than the attention leaves: declined, nothing evicted
    assert budget.kept_outputs == [30, 30] and not out_a.given_up
    assert budget.take(second, 50)  # needs 50: both outputs go (the earliest first), no attention does
    assert out_a.given_up and out_b.given_up and not first.given_up
    assert budget.kept == [40, 50] and budget.kept_outputs == []
    late = Holder()
    assert budget.take_output(late, 10)
    assert budget.take(Holder(), 50)  # the output goes first, then the earliest attention
    assert late.given_up and first.given_up and not second.given_up
    assert budget.kept == [50, 50] and budget.kept_outputs == []
    assert not budget.take(Holder(), 101)


def test_a_kept_output_is_handed_out_once_and_given_up_when_evicted():
    budget = KeepBudget(limit=1000)
    like = torch.zeros(2, 3, 4)
    kept = KeptOutput(budget=budget)
    tensor = kept.reserve(like)
    assert tensor.shape == like.shape and budget.kept_outputs == [like.nbytes]
    assert kept.take() is tensor and kept.take() is None and kept.reserve(like) is None
    evicted = KeptOutput(budget=budget)
    assert evicted.reserve(like) is not None
    assert budget.take(Holder(), 1000)  # an attention takes the whole budget
    assert evicted.take() is None
    assert KeptOutput(budget=KeepBudget(limit=10)).reserve(like) is None  # larger than the budget
