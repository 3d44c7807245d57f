"""Benchmarks and the deterministic workload generator shared by the bench, demo and tests."""
