"""Typed settings from the environment: bad values stop start-up with the variable's name."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import env_float


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "often"])
def test_env_float_rejects_values_outside_its_bounds(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("TEST_WEIGHT", value)
    with pytest.raises(ImproperlyConfigured, match="TEST_WEIGHT"):
        env_float("TEST_WEIGHT", 0.5, minimum=0.0, maximum=1.0)


@pytest.mark.parametrize(("value", "expected"), [(None, 0.5), ("0", 0.0), ("1", 1.0), ("0.8", 0.8)])
def test_env_float_reads_values_within_its_bounds(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                                  expected: float) -> None:
    if value is None:
        monkeypatch.delenv("TEST_WEIGHT", raising=False)
    else:
        monkeypatch.setenv("TEST_WEIGHT", value)
    assert env_float("TEST_WEIGHT", 0.5, minimum=0.0, maximum=1.0) == expected
    monkeypatch.setenv("TEST_WEIGHT", "7.5")
    assert env_float("TEST_WEIGHT", 0.5) == 7.5  # unbounded
