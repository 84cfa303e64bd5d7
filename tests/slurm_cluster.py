"""A real single-node Slurm cluster on this machine, for the job tests (shared/reference/environment.md §8).

Debian's slurm-wlm and munge (installed by .ci/install_slurm.sh when missing and we are root): munged (unless one
already answers), then slurmctld and `slurmd -N localhost` on free ports, with every file (slurm.conf, state,
logs) in a temporary BASE and SLURM_CONF pointing there, so /etc/slurm is never touched. The node declares 64 CPUs,
256 GB and one GPU (a stand-in device, /dev/null) whatever the machine has (`SlurmdParameters=config_overrides`), so
the jobs' own #SBATCH requests (run_eval.job's --gpus=1, --cpus-per-task=8, --mem=32G) are accepted unmodified.
Everything it started is stopped by PID, also when a test fails; daemon logs are attached to failures.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_CONF = """\
ClusterName=blipreprotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={base}/state/ctld
SlurmdSpoolDir={base}/state/d
SlurmctldPidFile={base}/state/slurmctld.pid
SlurmdPidFile={base}/state/slurmd.pid
SlurmctldLogFile={base}/logs/slurmctld.log
SlurmdLogFile={base}/logs/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={base}/logs/jobcomp.txt
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=10
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost CPUs=64 Sockets=1 CoresPerSocket=64 ThreadsPerCore=1 RealMemory=262144 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
GRES_CONF = "NodeName=localhost Name=gpu File=/dev/null\n"
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf")}
        self.pids: list[tuple[str, int]] = []  # (what, pid) of each daemon we started, stopped in reverse

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        return proc

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path = ROOT) -> str:
        proc = self.run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, log: Path | None = None, until=FINAL_STATES) -> dict:
        """Poll until the job reaches one of `until` (or fail after `timeout` s, cancelling it, with the logs)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id, check=False)
        raise AssertionError(f"job {job_id} not done after {timeout} s: {self.job(job_id)}\n{self.logs(log)}")

    def logs(self, job_log: Path | None = None, tail: int = 60) -> str:
        parts = []
        for p in [job_log, self.base / "logs" / "slurmctld.log", self.base / "logs" / "slurmd.log"]:
            if p is not None and Path(p).exists():
                lines = Path(p).read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"----- {p} (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel our jobs (slurmstepd outlives slurmd), then stop each daemon we started, by PID."""
        if any(what == "slurmctld" for what, _ in self.pids):
            self.run("scancel", "--full", "--partition=debug", check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for what, pid in reversed(self.pids):
            _terminate(pid)
        self.pids.clear()


def _alive(pid: int) -> bool:
    """Running, and not a zombie (a daemon's exited process lingers as one until init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _terminate(pid: int, grace: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_from(path: Path, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    raise AssertionError(f"{path} was not written within {timeout} s")


def _munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster (after trying .ci/install_slurm.sh), or None."""
    needed = ("slurmctld", "slurmd", "munged", "sbatch")
    if not all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in needed) and os.geteuid() == 0:
        subprocess.run(["bash", str(ROOT / ".ci" / "install_slurm.sh")], timeout=600)
    missing = [b for b in needed if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing) and .ci/install_slurm.sh could not install it"
    if os.geteuid() != 0:
        return "starting munged and slurmd needs root (SlurmUser=root); run the Slurm tests as root, as CI does"
    return None


def start(cluster: Cluster) -> None:
    """Bring the cluster up (about 5 s once installed); the caller must call cluster.stop(), also when this fails:
    every daemon started so far is in cluster.pids (see `slurm_cluster`)."""
    base = cluster.base
    for d in ("state/ctld", "state/d", "logs"):
        (base / d).mkdir(parents=True, exist_ok=True)
    (base / "slurm.conf").write_text(SLURM_CONF.format(base=base, ctld_port=_free_port(), d_port=_free_port()))
    (base / "gres.conf").write_text(GRES_CONF)
    if not _munge_works():
        run_munge = Path("/run/munge")
        run_munge.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_munge, "munge", "munge")
        run_munge.chmod(0o755)
        key = Path("/etc/munge/munge.key")
        if not key.exists() or key.stat().st_size == 0:
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        (run_munge / "munged.pid").unlink(missing_ok=True)
        cluster.run("runuser", "-u", "munge", "--", shutil.which("munged") or "/usr/sbin/munged")
        cluster.pids.append(("munged", _pid_from(run_munge / "munged.pid")))
    for what, cmd in (("slurmctld", ["slurmctld"]), ("slurmd", ["slurmd", "-N", "localhost"])):
        cluster.run(shutil.which(cmd[0]) or f"/usr/sbin/{cmd[0]}", *cmd[1:])
        cluster.pids.append((what, _pid_from(base / "state" / f"{what}.pid")))
    deadline = time.time() + 60
    while time.time() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if state == "idle":
            return
        if "drain" in state:  # a node drained by an earlier run's state: we own this cluster, resume it
            cluster.run("scontrol", "update", "nodename=localhost", "state=resume", check=False)
        time.sleep(0.5)
    raise AssertionError(f"the node did not become idle within 60 s (sinfo: {state!r})\n{cluster.logs()}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running cluster for the whole session; skipped, with the reason, only where Slurm cannot be installed."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        start(cluster)
        yield cluster
    finally:
        cluster.stop()
