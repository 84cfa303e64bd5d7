"""The blip-repro command line."""
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "blip_repro.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_commands():
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("zoo", "download", "evaluate", "train", "reproduce", "report"):
        assert cmd in out.stdout


def test_zoo_lists_every_model_with_its_revision():
    from blip_repro.zoo import MODELS

    out = run("zoo")
    assert out.returncode == 0
    for spec in MODELS.values():
        assert spec.name in out.stdout
        if spec.revision:
            assert spec.revision[:12] in out.stdout
    assert "without released weights" in out.stdout


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    out = run("evaluate", "--params", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "nope.yaml" in out.stderr
    out = run("download", "cocoo")
    assert out.returncode == 2 and "cocoo" in out.stderr and "Traceback" not in out.stderr


def test_download_dry_run_describes_coco():
    out = run("download", "--dry-run", "coco")
    assert out.returncode == 0 and "coco_karpathy_test" in out.stdout
