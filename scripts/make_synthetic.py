"""Writes the synthetic occlusion dataset (same as `oanet-make-synthetic`).

python scripts/make_synthetic.py --out data/synthetic --num-images 1000 --seed 0 --size 128 128
"""

from oanet_jax.data.synthetic import main

if __name__ == "__main__":
    main()
