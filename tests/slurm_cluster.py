"""A single-node SLURM cluster on localhost for tests (Debian slurm-wlm + munge, as root).

Spool, logs and pid files live in a temporary folder. The configuration goes to
/etc/slurm (job steps started by srun inside a job read it from there); files already there
are moved aside and put back on stop. Only the daemons started here are stopped, by pid.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")

SLURM_CONF = """\
ClusterName=superweights-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
NodeName={host} CPUs={cpus} RealMemory={memory} Gres=gpu:1 State=UNKNOWN
"""
PARTITION = "PartitionName={name} Nodes=ALL Default={default} MaxTime=INFINITE State=UP\n"


def why_unavailable() -> str | None:
    """The reason a local SLURM cannot run here, or None."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    missing = [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)}); .ci/run installs them"
    return None


def _read_pid(path: Path, timeout: float = 20.0) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.2)
    raise RuntimeError(f"daemon did not write {path}")


class LocalSlurm:
    """Start munge (if not running), slurmctld and slurmd; stop what was started.

    `partitions` all span the one node; the first is the default.
    """

    def __init__(
        self, root: Path, partitions: tuple[str, ...] = ("debug",), conf_dir=Path("/etc/slurm")
    ):
        self.root = root
        self.partitions = partitions
        self.conf_dir = conf_dir
        self.pids: list[int] = []
        self.backups: list[tuple[Path, Path]] = []
        self.installed: list[Path] = []

    def start(self) -> "LocalSlurm":
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        memory = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        conf = SLURM_CONF.format(host=host, root=self.root, cpus=os.cpu_count(), memory=memory)
        for i, name in enumerate(self.partitions):
            conf += PARTITION.format(name=name, default="YES" if i == 0 else "NO")
        self._install("slurm.conf", conf)
        self._install("gres.conf", f"NodeName={host} Name=gpu File=/dev/null\n")
        self._start_munge()
        subprocess.run(["slurmctld"], check=True)
        self.pids.append(_read_pid(self.root / "slurmctld.pid"))
        subprocess.run(["slurmd"], check=True)
        self.pids.append(_read_pid(self.root / "slurmd.pid"))
        self._wait_idle()
        return self

    def _install(self, name: str, text: str) -> None:
        target = self.conf_dir / name
        if target.exists():
            backup = self.root / f"{name}.orig"
            shutil.move(target, backup)
            self.backups.append((backup, target))
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        self.installed.append(target)

    def _start_munge(self) -> None:
        socket_path = Path("/run/munge/munge.socket.2")
        if socket_path.exists():
            probe = subprocess.run(["munge", "-n"], capture_output=True)
            if probe.returncode == 0:
                return
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
        self.pids.append(_read_pid(Path("/run/munge/munged.pid")))

    def _wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
            if set(out.stdout.split()) <= {"idle", "mix"} and out.stdout.strip():
                return
            time.sleep(1)
        log = (self.root / "slurmctld.log").read_text()[-2000:]
        raise RuntimeError(f"SLURM node did not become idle; slurmctld log tail:\n{log}")

    def stop(self) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        self.pids.clear()
        for target in self.installed:
            target.unlink(missing_ok=True)
        self.installed.clear()
        for backup, target in self.backups:
            shutil.move(backup, target)
        self.backups.clear()
