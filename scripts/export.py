"""Exports a checkpoint's panoptic inference (jax.export or SavedModel); see `oanet_jax.export`."""

from oanet_jax.export import main

if __name__ == "__main__":
    main()
