"""The benchmark scripts' smoke runs measure the machine's matmul rate with 1024^3 products, not 4096^3
(benchmarks/compare.py's REFORMER_RATE_SIZE): a few seconds less per measurement, the same code."""

import pytest


@pytest.fixture(autouse=True)
def small_rate_products(monkeypatch):
    monkeypatch.setenv("REFORMER_RATE_SIZE", "1024")
