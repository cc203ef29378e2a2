"""Benchmarks: they print their figures and write JSON; none of them is a test."""
