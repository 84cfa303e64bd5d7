"""The environment files and the README commands agree with each other and with CI."""
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_match_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d for d in env["dependencies"] if isinstance(d, dict))["pip"]
    assert sorted(pip) == sorted(pins)
    assert all("==" in p for p in pins)  # every direct dependency pinned
    assert "python=3.11" in env["dependencies"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1: readme.index("```bash") + 3]
    assert block[0].startswith("bash create_env.sh -- blip-repro reproduce --suite shapes")
    test_cmd = block[1].split("#")[0].strip()
    assert test_cmd in (ROOT / ".ci/run").read_text()
