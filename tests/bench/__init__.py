"""Benchmarks (not collected by pytest: no test_*.py here). Run: python -m tests.bench.run"""
