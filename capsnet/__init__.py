"""capsnet: capsule networks with EM routing (Hinton, Sabour & Frosst, ICLR 2018)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["CapsNet", "CapsOutput", "Config", "__version__", "load_checkpoint", "load_config"]


def __getattr__(name: str):
    # Lazy imports keep `import capsnet` (and the CLI's --help) fast.
    if name in ("CapsNet", "CapsOutput"):
        from capsnet import model

        return getattr(model, name)
    if name in ("Config", "load_config"):
        from capsnet import config

        return getattr(config, name)
    if name == "load_checkpoint":
        from capsnet import checkpoint

        return checkpoint.load_checkpoint
    raise AttributeError(f"module 'capsnet' has no attribute {name!r}")
