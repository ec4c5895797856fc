"""A real single-node SLURM cluster on 127.0.0.1 for tests, from Debian's packages.

``start()`` writes /etc/slurm/slurm.conf (SLURM's nested srun reads it from there), starts
munged, slurmctld and slurmd with their state, logs and PID files in a temporary folder,
and waits for the node to be idle; ``stop()`` kills the daemons it started by their PIDs.
Needs root. Packages are installed with apt-get when missing and ``CI`` or
``CRYOMATCH_INSTALL_SLURM`` is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged"]
CONF = Path("/etc/slurm/slurm.conf")
MARK = "# written by cryomatch's tests"


def unavailable_reason() -> str | None:
    """Why a test cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd and writing /etc/slurm/slurm.conf needs root"
    if CONF.exists() and MARK not in CONF.read_text():
        return f"{CONF} belongs to a real SLURM installation; not touching it"
    if not all(shutil.which(b) for b in BINARIES):
        if not (os.environ.get("CI") or os.environ.get("CRYOMATCH_INSTALL_SLURM")):
            return "SLURM is not installed (set CRYOMATCH_INSTALL_SLURM=1 to apt-get it)"
        if not shutil.which("apt-get"):
            return "SLURM is not installed and apt-get is not available"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True
        )
        if done.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
            return f"apt-get could not install {' '.join(PACKAGES)}: {done.stderr.decode()[-300:]}"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.pids: list[int] = []

    def start(self, timeout: float = 60.0) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        f = self.folder
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(
            f"""{MARK}
ClusterName=cryomatch-test
SlurmctldHost={host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
ReturnToService=2
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""
        )
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            # munged runs as the munge user, which cannot enter pytest's root-only temporary
            # folders: its PID file goes to its own run folder.
            pid_file = Path("/run/munge/cryomatch-test-munged.pid")
            subprocess.run(
                ["runuser", "-u", "munge", "--", "munged", "--pid-file", str(pid_file)],
                check=True,
            )
            self._track(pid_file)
        subprocess.run(["slurmctld"], check=True)
        self._track(f / "slurmctld.pid")
        subprocess.run(["slurmd"], check=True)
        self._track(f / "slurmd.pid")
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True
            ).stdout
            if state.strip() == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node not idle after {timeout} s: {state!r}")

    def _track(self, path: Path) -> None:
        for _ in range(50):
            if path.exists() and path.read_text().strip():
                self.pids.append(int(path.read_text().split()[0]))
                return
            time.sleep(0.1)
        raise RuntimeError(f"no PID file {path}")

    def jobs(self) -> list[dict[str, str]]:
        """SLURM's own records of the jobs it ran (scontrol keeps them for MinJobAge)."""
        text = subprocess.run(
            ["scontrol", "show", "jobs", "-o"], capture_output=True, text=True
        ).stdout
        return [
            dict(f.split("=", 1) for f in line.split() if "=" in f) for line in text.splitlines()
        ]

    def stop(self) -> None:
        """Kill the daemons started here by PID and remove the config written here (with it
        left behind, every SLURM client, the Snakemake plugin's probes too, waits for a
        controller that is gone)."""
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
        self.pids.clear()
        if CONF.exists() and MARK in CONF.read_text():
            CONF.unlink()
