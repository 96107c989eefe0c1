"""Panoptic predictions of images, score order vs SRM order; see `oanet_jax.predict` for flags."""

from oanet_jax.predict import main

if __name__ == "__main__":
    main()
