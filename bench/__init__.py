"""Benchmarks of the coordinator: `coordinator bench SCENARIO` (see bench/README.md)."""
