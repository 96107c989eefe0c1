"""Benchmarks (same as `oanet-benchmark`): python scripts/benchmark.py ops pq model train."""

from oanet_jax.bench.main import main

if __name__ == "__main__":
    main()
