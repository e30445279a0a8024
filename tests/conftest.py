"""Shared test set-up: slow tests run only with --runslow or CAPSNET_SLOW=1."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CAPSNET_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or CAPSNET_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config_path() -> Path:
    return TINY
