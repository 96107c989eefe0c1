"""Trains OANet (same as `oanet-train`); see `oanet_jax/train/main.py` for the flags.

python scripts/train.py --config configs/synthetic.py --workdir workdir/synthetic
"""

from oanet_jax.train.main import main

if __name__ == "__main__":
    main()
