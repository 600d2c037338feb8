"""Helpers the data tests share: draw batches from an iterator and compare them."""

import itertools
from collections.abc import Iterable

import numpy as np


def take(it: Iterable, n: int) -> list:
    """The next `n` items of `it`."""
    return list(itertools.islice(it, n))


def assert_batches_equal(xs: list[dict], ys: list[dict]) -> None:
    """Two lists of batches hold the same keys and bit-identical arrays."""
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
