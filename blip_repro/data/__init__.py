"""Datasets: where they live, how they are read, downloaded and (for `shapes`) generated."""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """`$BLIP_REPRO_DATA`, default `data/` in the project checkout (never inside the installed package or `/`)."""
    from blip_repro.fileio import project_root

    env = os.environ.get("BLIP_REPRO_DATA")
    return Path(env).expanduser().resolve() if env else project_root() / "data"
