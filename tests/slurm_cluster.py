"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd started as
root from a slurm.conf in a temporary folder, stopped again by the PIDs this module
started (a munged that was already running is used and left alone).

When the daemons are missing and we are root, Debian's ``slurm-wlm`` and ``munge`` are
installed with apt-get first, so the README's test command passes on a fresh machine.
Not root, or no way to install them: ``SlurmUnavailable`` (the tests skip, saying why).
Installed but the cluster does not come up: ``SlurmFailed`` (the tests fail).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_SOCKET_DIR = Path("/run/munge")
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
PACKAGES = ("slurm-wlm", "munge")  # Debian's
CTLD_PORT, SLURMD_PORT = 16817, 16818
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """No Slurm test cluster can run here: not root, or the daemons cannot be installed."""


class SlurmFailed(RuntimeError):
    """Slurm is installed but the test cluster did not come up: a real failure."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_installed() -> None:
    """As root, ``apt-get update`` then ``apt-get install -y slurm-wlm munge`` when any daemon
    or command is missing from PATH."""
    missing = missing_binaries()
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"not on PATH: {', '.join(missing)}, and no apt-get to install "
                               f"{' '.join(PACKAGES)}: install them by hand")  # fmt: skip
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(argv)} took over 900 s") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise SlurmUnavailable(f"{' '.join(argv)} failed with {proc.returncode}: {tail}")
    still = missing_binaries()
    if still:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)}, but still not on PATH: {', '.join(still)}")


class SlurmCluster:
    """``start()`` gives a cluster whose ``env`` (with ``SLURM_CONF``) the Slurm commands need."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mae-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._started: list[tuple[str, subprocess.Popen]] = []

    # -- start

    def start(self) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("not root: the test cluster's daemons must be started as root")
        ensure_installed()
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait_idle(timeout=60)
        except (OSError, KeyError, subprocess.SubprocessError) as err:  # e.g. no munge user, a hung command
            self.stop()
            raise SlurmFailed(f"{type(err).__name__}: {err}") from err
        except BaseException:
            self.stop()
            raise
        return self

    def _munge_works(self) -> bool:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=30)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=30).returncode == 0

    def _start_munge(self) -> None:
        if self._munge_works():
            return  # a munged is already serving the default socket: use it, leave it running
        munge = pwd.getpwnam("munge")
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            os.chown(MUNGE_KEY.parent, munge.pw_uid, munge.pw_gid)
        os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
        MUNGE_KEY.chmod(0o400)
        MUNGE_SOCKET_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chown(MUNGE_SOCKET_DIR, munge.pw_uid, munge.pw_gid)
        state = self.root / "munge"
        self.root.chmod(0o755)  # munged (as the munge user) checks every folder on its paths
        state.mkdir(mode=0o700)
        os.chown(state, munge.pw_uid, munge.pw_gid)
        self._spawn("munged", ["munged", "-F", f"--log-file={state / 'munged.log'}",
                               f"--pid-file={state / 'munged.pid'}", f"--seed-file={state / 'munged.seed'}"],
                    user="munge")  # fmt: skip
        self._wait(self._munge_works, 20, "munged to answer")

    def _write_conf(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        mem_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
        r = self.root
        self.conf.write_text(f"""\
ClusterName=maetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=3600
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={mem_mb * 3 // 4} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, user=user,
                                start_new_session=True)  # fmt: skip
        log.close()
        self._started.append((name, proc))

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self._started:
                if proc.poll() is not None:
                    raise SlurmFailed(
                        f"{name} exited with {proc.returncode} while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmFailed(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(0.5)

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env,
                                 timeout=30)  # fmt: skip
            return out.returncode == 0 and out.stdout.strip() == "idle"

        self._wait(idle, timeout, f"node {self.node} to be idle in sinfo")

    # -- use

    def logs(self, tail: int = 3000) -> str:
        parts = []
        daemons = [*sorted(self.root.glob("*.log")), *sorted(self.root.glob("*.stdout"))]
        for path in [*daemons, self.root / "munge" / "munged.log"]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def squeue(self) -> str:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, env=self.env, timeout=30)
        return out.stdout.strip()

    # -- stop

    def stop(self) -> None:
        """Stop exactly the daemons this object started, newest first."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._started):
            # jobs left by a failed test: their slurmstepd processes would outlive slurmd
            try:
                subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True, timeout=30)
                deadline = time.monotonic() + 30
                while self.squeue() and time.monotonic() < deadline:
                    time.sleep(1)
            except subprocess.SubprocessError:
                pass  # stop the daemons all the same
        while self._started:
            name, proc = self._started.pop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)
