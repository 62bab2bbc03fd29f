"""Benchmarks run by `make bench`: each prints a table and writes results/benchmarks/{name}.json."""
