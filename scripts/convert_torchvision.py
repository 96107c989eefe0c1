"""Converts a torchvision checkpoint (same as `oanet-convert`); see `oanet_jax/convert/main.py`.

python scripts/convert_torchvision.py IN.pth OUT_DIR [--config configs/base.py]
"""

from oanet_jax.convert.main import main

if __name__ == "__main__":
    main()
