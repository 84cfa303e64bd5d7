"""Test session setup: data and outputs go to a cache folder shared by the whole session (and kept between local
runs, gitignored), so tiny models are trained once; `BLIP_REPRO_TEST_CACHE` moves it."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BLIP_REPRO_TEST_CACHE", ROOT / "outputs" / "test-cache")).resolve()
os.environ["BLIP_REPRO_DATA"] = str(CACHE / "data")
os.environ["BLIP_REPRO_OUTPUTS"] = str(CACHE / "outputs")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as fake_openai
