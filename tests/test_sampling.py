"""Task samplers: empirical frequencies, epoch lengths, determinism, registry."""

import collections

import numpy as np
import pytest

from mtbert.data.sampling import (
    SAMPLERS,
    AnnealedSampler,
    ProportionalSampler,
    RoundRobinSampler,
    TemperatureSampler,
    build_sampler,
)

SIZES = {"sst": 8000, "para": 1500, "sts": 500}
BATCHES = {"sst": 8, "para": 8, "sts": 8}
STEPS = 20_000


def _frequencies(sampler, steps):
    counts = collections.Counter(sampler.tasks_for_step(step)[0] for step in steps)
    total = sum(counts.values())
    return np.array([counts[name] / total for name in SIZES])


def _normalised(values):
    values = np.asarray(values, dtype=np.float64)
    return values / values.sum()


def test_proportional_frequencies_follow_task_sizes():
    sampler = ProportionalSampler(SIZES, BATCHES, seed=0)
    expected = _normalised(list(SIZES.values()))  # 0.8, 0.15, 0.05
    np.testing.assert_allclose(_frequencies(sampler, range(STEPS)), expected, atol=0.01)


def test_temperature_two_follows_square_root_of_sizes():
    sampler = TemperatureSampler(SIZES, BATCHES, seed=1, temperature=2.0)
    expected = _normalised(np.sqrt(list(SIZES.values())))  # ~0.60, 0.26, 0.15
    np.testing.assert_allclose(sampler.probabilities(0), expected)
    np.testing.assert_allclose(_frequencies(sampler, range(STEPS)), expected, atol=0.01)


def test_large_temperature_is_close_to_uniform():
    sampler = TemperatureSampler(SIZES, BATCHES, seed=2, temperature=1000.0)
    np.testing.assert_allclose(_frequencies(sampler, range(STEPS)), [1 / 3] * 3, atol=0.01)


def test_annealed_goes_from_proportional_to_fifth_root_of_sizes():
    batches = {name: 1 for name in SIZES}  # 10,000 steps per epoch
    sampler = AnnealedSampler(SIZES, batches, seed=3, epochs=5)
    assert sampler.steps_per_epoch() == 10_000
    assert sampler.num_epochs == 5
    assert [sampler.alpha(e * 10_000) for e in range(5)] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    assert sampler.alpha(9_999) == 1.0
    assert sampler.alpha(60_000) == pytest.approx(0.2)  # capped at the last epoch
    sizes = list(SIZES.values())
    first = _frequencies(sampler, range(0, 10_000))
    last = _frequencies(sampler, range(40_000, 50_000))
    np.testing.assert_allclose(first, _normalised(sizes), atol=0.01)
    np.testing.assert_allclose(last, _normalised(np.power(sizes, 0.2)), atol=0.01)


def test_a_run_cut_short_by_a_step_cap_anneals_to_the_end_within_it():
    """Budgets cap steps: 1,000 steps of a 5-epoch, 50,000-step plan. With epochs of data the
    anneal never left proportional sampling (the annealed row equalled proportional); the
    schedule now has 5 epochs of 200 steps."""
    batches = {name: 1 for name in SIZES}  # 10,000 steps per epoch
    sampler = AnnealedSampler(SIZES, batches, seed=3, epochs=5)
    sampler.fit_schedule(1_000)
    assert [sampler.alpha(step) for step in (0, 199, 200, 399, 400, 800, 999)] == pytest.approx(
        [1, 1, 0.8, 0.8, 0.6, 0.2, 0.2])
    uncut = AnnealedSampler(SIZES, batches, seed=3, epochs=5)
    uncut.fit_schedule(50_000)  # the whole plan: epochs of data, as before
    assert [uncut.epoch_of(step) for step in (0, 9_999, 10_000, 49_999)] == [0, 0, 1, 4]


def test_fractional_epochs_keep_epochs_of_data_when_the_run_is_not_cut():
    sampler = ProportionalSampler(SIZES, BATCHES, seed=0, epochs=2.5)  # 1,250 steps per epoch
    sampler.fit_schedule(3_125)
    assert sampler.schedule_epoch_steps == 1_250
    assert [sampler.epoch_of(step) for step in (1_249, 1_250, 2_500, 3_124)] == [0, 1, 2, 2]


def test_annealed_needs_epochs():
    with pytest.raises(ValueError, match="epochs"):
        AnnealedSampler(SIZES, BATCHES, seed=0)


def test_round_robin_returns_every_task_in_order():
    sampler = RoundRobinSampler(SIZES, BATCHES, seed=0)
    assert all(sampler.tasks_for_step(step) == ["sst", "para", "sts"] for step in range(50))


def test_steps_per_epoch_definitions():
    sizes, batches = {"a": 10, "b": 7}, {"a": 4, "b": 3}
    # max(ceil(10/4), ceil(7/2)) = max(3, 4)
    assert RoundRobinSampler(sizes, {"a": 4, "b": 2}, seed=0).steps_per_epoch() == 4
    # ceil(10/4 + 7/3) = ceil(4.83)
    assert ProportionalSampler(sizes, batches, seed=0).steps_per_epoch() == 5
    assert TemperatureSampler(sizes, batches, seed=0).steps_per_epoch() == 5
    # exact sum: 6/3 + 9/3 = 5, not ceil of a float a hair above 5
    assert ProportionalSampler({"a": 6, "b": 9}, {"a": 3, "b": 3}, 0).steps_per_epoch() == 5


@pytest.mark.parametrize("name", ["proportional", "temperature", "annealed"])
def test_draws_are_a_pure_function_of_seed_and_step(name):
    def build(seed):
        return build_sampler(name, SIZES, BATCHES, seed=seed, epochs=3)

    steps = range(0, 2_000, 7)
    first = [build(11).tasks_for_step(step) for step in steps]
    same = build(11)
    assert [same.tasks_for_step(step) for step in reversed(steps)][::-1] == first
    other = build(12)
    assert [other.tasks_for_step(step) for step in steps] != first


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registry_name_builds(name):
    sampler = build_sampler(name, SIZES, BATCHES, seed=0, epochs=2)
    assert isinstance(sampler, SAMPLERS[name])
    assert set(sampler.tasks_for_step(0)) <= set(SIZES)


def test_builder_and_constructor_errors():
    with pytest.raises(ValueError, match="round_robin"):
        build_sampler("uniform", SIZES, BATCHES, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        build_sampler("temperature", SIZES, BATCHES, seed=0, temprature=3.0)
    with pytest.raises(ValueError, match="Batch sizes"):
        ProportionalSampler(SIZES, {"sst": 8}, seed=0)
    with pytest.raises(ValueError, match="step"):
        ProportionalSampler(SIZES, BATCHES, seed=0).tasks_for_step(-1)
