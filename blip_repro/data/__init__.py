"""Datasets: where they live, how they are read, downloaded and (for `shapes`) generated."""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """`$BLIP_REPRO_DATA`, default `./data` (relative to the working directory), never inside the package."""
    return Path(os.environ.get("BLIP_REPRO_DATA", "data")).expanduser().resolve()
