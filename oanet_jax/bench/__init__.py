"""Benchmarks of oanet-jax side by side with its peers (`python -m oanet_jax.bench SECTION`).

Each section lives in its own module and returns a JSON-able dict; `timing.py` is the one timer.
"""
