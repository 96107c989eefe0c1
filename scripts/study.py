"""The study of the paper's claims on the synthetic benchmark (same as `oanet-study`).

python scripts/study.py --out workdir/study   # see oanet_jax/study/main.py for the flags
"""

from oanet_jax.study.main import cli

if __name__ == "__main__":
    cli()
