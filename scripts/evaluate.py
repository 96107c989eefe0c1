"""Evaluates a checkpoint on the eval split; see `oanet_jax.eval.main` for the flags."""

from oanet_jax.eval.main import main

if __name__ == "__main__":
    main()
