"""The batcher's cost model for admission by expected wait (model_service.batcher.ForwardCost)."""

from __future__ import annotations

import pytest

from model_service.batcher import ForwardCost


def test_nothing_measured_means_no_estimate():
    assert ForwardCost(overhead_tokens=64).estimate(1000, 1) is None


def test_the_fixed_cost_of_a_small_pass_is_not_charged_per_token_of_a_large_one():
    """Issue: measured on one-sentence passes (12 tokens, mostly fixed cost), a cost per token made a
    16,384-token pass look 6x longer than the same overhead model predicts, so small callers were
    refused while a large batch computed."""
    cost = ForwardCost(overhead_tokens=64)
    cost.observe(seconds=0.020, padded_tokens=12)
    small = cost.estimate(12, passes=1)
    assert small == pytest.approx(0.020)  # what was measured comes back
    large = cost.estimate(16384, passes=1)
    assert large == pytest.approx(0.020 * (16384 + 64) / (12 + 64))
    assert large < 0.25 * 16384 * 0.020 / 12  # the per-token reading would have been over 6x this


def test_each_pass_pays_its_overhead_and_the_average_follows_new_passes():
    cost = ForwardCost(overhead_tokens=10)
    cost.observe(seconds=1.0, padded_tokens=90)  # 0.01 s per token-equivalent
    assert cost.estimate(90, passes=3) == pytest.approx((90 + 30) * 0.01)
    cost.observe(seconds=2.0, padded_tokens=90)  # slower now: the average moves by SMOOTHING
    assert cost.seconds_per_token == pytest.approx(0.8 * 0.01 + 0.2 * 0.02)


def test_tokens_within_a_time_leave_room_for_the_pass_overhead_and_at_least_one_token():
    cost = ForwardCost(overhead_tokens=10)
    assert cost.tokens_within(0.05) is None  # nothing measured yet
    cost.observe(seconds=1.0, padded_tokens=990)  # 1 ms per token-equivalent
    assert cost.tokens_within(0.05) == 40
    assert cost.estimate(cost.tokens_within(0.05), passes=1) == pytest.approx(0.05)
    assert cost.tokens_within(0.001) == 1  # less than one pass's overhead: one row still fits
