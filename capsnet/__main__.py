"""``python -m capsnet ...`` and ``torchrun --nproc-per-node N -m capsnet train ...``."""

from capsnet.cli import main

if __name__ == "__main__":
    main()
