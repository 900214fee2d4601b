"""Benchmarks are opt-in: they are collected only when named (pytest.ini's testpaths is tests/) and, even then,
skipped unless --benchmark-only or --benchmark-enable is passed, so `pytest benchmarks/` alone stays cheap.

    pytest benchmarks/ --benchmark-only
"""
import pytest


@pytest.fixture(autouse=True)
def _benchmarks_are_opt_in(request):
    option = request.config.option
    if not (getattr(option, "benchmark_only", False) or getattr(option, "benchmark_enable", False)):
        pytest.skip("a benchmark: pass --benchmark-only (or --benchmark-enable) to run it")
