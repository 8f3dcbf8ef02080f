"""Benchmarks: run each as ``python -m bench.NAME`` from the repository root; tables print, JSON goes to bench/results/."""
