from __future__ import annotations

import pytest

from loadtests.stats import coefficient_of_variation, mean, percentile


def test_percentile_interpolates_like_numpy_default() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 25) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_mean_and_coefficient_of_variation() -> None:
    assert mean([1.0, 2.0, 3.0]) == 2.0
    assert mean([]) is None
    assert coefficient_of_variation([4.0, 4.0, 4.0]) == 0.0
    assert coefficient_of_variation([0.0, 2.0]) == pytest.approx(1.0)
    assert coefficient_of_variation([0.0, 0.0]) is None
    assert coefficient_of_variation([]) is None
