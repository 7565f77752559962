"""The training order: mixture proportions, determinism, stopping rules, curriculum pacing."""

import numpy as np
import pytest

from nlm.data.curriculum import difficulty_ranking
from nlm.data.sampler import OrderPlan, OrderSampler, Pacing, pacing_fraction
from nlm.errors import ConfigError


def _plan(**kw):
    base = dict(sizes=[3000, 3000, 3000], weights=[0.6, 0.3, 0.1], names=["a", "b", "c"], seed=7, size=2000)
    base.update(kw)
    return OrderPlan(**base)


def test_mixture_proportions_are_within_three_points_over_2000_draws():
    plan = _plan()
    order = plan.epoch_order(0)
    assert len(order) == 2000
    sources = np.array([plan.source_of(i) for i in order])
    for s, weight in enumerate([0.6, 0.3, 0.1]):
        assert abs((sources == s).mean() - weight) <= 0.03
        # every prefix follows the weights too (stratified), not only the whole epoch
        assert abs((sources[:500] == s).mean() - weight) <= 0.03 + 0.05


def test_same_seed_same_order_and_another_seed_or_epoch_another():
    a, b = _plan().epoch_order(0), _plan().epoch_order(0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, _plan(seed=8).epoch_order(0))
    assert not np.array_equal(a, _plan().epoch_order(1))


def test_examples_stay_inside_their_source_and_are_not_repeated_before_exhaustion():
    plan = _plan(sizes=[1000, 500, 200], size=None, stopping="first_exhausted")
    order = plan.epoch_order(0)
    assert len(order) == plan.epoch_length() == 1666  # b runs out first: 500 examples at p=0.3
    assert len(set(order.tolist())) == len(order)
    assert order.max() < 1700 and order.min() >= 0


def test_all_exhausted_sees_every_example_of_every_source():
    plan = _plan(sizes=[100, 500, 50], size=None, stopping="all_exhausted")
    order = plan.epoch_order(3)
    assert plan.epoch_length() == 1667  # b: 500 examples at p=0.3
    assert set(order.tolist()) == set(range(650))
    counts = np.bincount([plan.source_of(i) for i in order])
    assert counts.tolist() == plan.quotas(1667)


def test_sampler_follows_set_epoch():
    plan = _plan()
    sampler = OrderSampler(plan)
    assert len(sampler) == 2000
    sampler.set_epoch(2)
    assert list(sampler) == plan.epoch_order(2).tolist()


def test_drawn_counts_add_up_over_epochs():
    plan = _plan(size=100)
    drawn = plan.drawn_counts(250)
    assert sum(drawn.values()) == 250
    partial = np.bincount(plan.source_sequence(2)[:50], minlength=3)
    assert drawn == {"a": 120 + partial[0], "b": 60 + partial[1], "c": 20 + partial[2]}


def test_bad_weights_and_stopping_are_config_errors():
    with pytest.raises(ConfigError, match="weight"):
        _plan(weights=[1, 0, 1])
    with pytest.raises(ConfigError, match="mixture_stopping"):
        _plan(stopping="never")


@pytest.mark.parametrize("pacing", ["linear", "step", "root"])
def test_pacing_starts_at_start_fraction_and_is_full_at_full_at(pacing):
    assert pacing_fraction(0.0, pacing, 0.2, 0.5) == pytest.approx(0.2)
    assert pacing_fraction(0.5, pacing, 0.2, 0.5) == 1.0
    values = [pacing_fraction(t, pacing, 0.2, 0.5) for t in np.linspace(0, 1, 50)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_curriculum_orders_easy_to_hard_and_grows_on_schedule():
    n = 1000
    difficulty = np.random.default_rng(0).permutation(n).astype(float)  # example i has difficulty rank difficulty[i]
    ranking = difficulty_ranking(difficulty, "easy_first")
    plan = OrderPlan(sizes=[n], weights=[1.0], names=["train"], seed=3, ranking=[ranking],
                     pacing=Pacing("linear", 0.2, 0.5), total_draws=2 * n)
    first, second = plan.epoch_order(0), plan.epoch_order(1)
    draws = np.concatenate([first, second])
    ranks = difficulty[draws]
    for position in range(0, 2 * n, 50):
        allowed = int(np.ceil(pacing_fraction(position / (2 * n), "linear", 0.2, 0.5) * n))
        assert ranks[position] < allowed  # only the easiest pool(progress) is ever sampled
    assert ranks[:20].max() < 200 + 20  # the start: the easiest 20% only (the pool grows 0.8 per draw here)
    assert len(set(draws[:1000].tolist())) == 1000  # the pool outgrows the draws: no example twice before full_at
    assert ranks[:500].mean() < ranks[500:1000].mean()  # easy to hard
    assert ranks[1000:].max() == n - 1  # after full_at the whole source is sampled


def test_hard_first_reverses_the_ranking():
    scores = np.array([3.0, 1.0, 2.0, 1.0])
    assert difficulty_ranking(scores, "easy_first").tolist() == [1, 3, 2, 0]
    assert difficulty_ranking(scores, "hard_first").tolist() == [0, 2, 1, 3]
