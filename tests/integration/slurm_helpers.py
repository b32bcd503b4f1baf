"""A single-node Slurm cluster for tests: munged, slurmctld and slurmd started in the foreground from a private
state folder (own munge key and socket, own slurm.conf on free 127.0.0.1 ports), stopped by the PIDs started.

The Debian packages (slurmctld, slurmd, slurm-client, munge) come from ``scripts/test.sh``. Jobs run as the user
that runs the tests (root in CI): slurmd runs as that user and so does every job step. Client commands need
:attr:`SlurmCluster.env` (``SLURM_CONF``).

Plugins: ``task/none`` and ``proctrack/linuxproc`` (the cgroup plugins need a delegated cgroup tree that CI
containers lack: slurmd starts, then every step fails); ``select/cons_tres`` with ``CR_Core``; no accounting.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from proc_helpers import free_ports  # noqa: F401 (also used by test_slurm.py)

SLURM_BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "srun")
#: job states after which a job does not run again (by itself)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def missing_binaries() -> list[str]:
    """The Slurm/munge programs of :data:`SLURM_BINARIES` not on PATH (or in /usr/sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in SLURM_BINARIES if shutil.which(b, path=path) is None]


def slurm_conf(root: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """The text of a one-node ``slurm.conf`` keeping all state under ``root``."""
    user = pwd.getpwuid(os.getuid()).pw_name
    return f"""\
ClusterName=polymaetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={root}/run/munge.sock,cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine, all state in ``root`` (created 0755: munge's socket folder
    must be searchable by clients). :meth:`start` returns each service's start time in seconds."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])}

    # ---- start / stop -------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> dict[str, float]:
        """Write the key and slurm.conf, start the three services, wait until the node is idle."""
        for sub in ("key", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "run", 0o755)
        ctld_port, slurmd_port = free_ports(2)
        cpus = max(2, os.cpu_count() or 2)
        self.conf.write_text(slurm_conf(self.root, self.node, cpus, ctld_port, slurmd_port))
        times = {}
        t = time.perf_counter()
        key = self.root / "key" / "munge.key"
        self._check(["mungekey", "-c", "-k", str(key)])
        os.chmod(self.root / "key", 0o700)
        sock = self.root / "run" / "munge.sock"
        self._spawn("munged", ["munged", "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                               f"--log-file={self.root}/log/munged.log", f"--pid-file={self.root}/run/munged.pid",
                               f"--seed-file={self.root}/run/munged.seed"])
        self._wait("munged", lambda: self._ok(["munge", "-n", "-S", str(sock)]), timeout)
        times["munged"] = time.perf_counter() - t
        t = time.perf_counter()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: "UP" in self._out(["scontrol", "ping"]), timeout)
        times["slurmctld"] = time.perf_counter() - t
        t = time.perf_counter()
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait("slurmd", lambda: self._out(["sinfo", "-h", "-N", "-o", "%t"]).strip() == "idle", timeout)
        times["slurmd"] = time.perf_counter() - t
        return times

    def stop(self, timeout: float = 30) -> None:
        """Cancel what is left of the jobs, wait for their steps to end, then SIGTERM slurmd, slurmctld and
        munged (SIGKILL after ``timeout``), each by the PID :meth:`start` got."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            ids = self._out(["squeue", "-h", "-o", "%i"]).split()
            if ids:
                self._ok(["scancel", *ids])
                end = time.time() + timeout
                while time.time() < end and self._out(["squeue", "-h", "-o", "%i"]).split():
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for fh in self._logs:
            fh.close()

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait(self, name: str, ready, timeout: float) -> None:
        end = time.time() + timeout
        while not ready():
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with status {self.procs[name].returncode}:\n{self.logs(name)}")
            if time.time() > end:
                raise RuntimeError(f"{name} not ready after {timeout} s:\n{self.logs(name)}")
            time.sleep(0.1)

    def logs(self, name: str, tail: int = 4000) -> str:
        """The end of service ``name``'s log files (for failure messages)."""
        out = []
        for path in sorted((self.root / "log").glob(f"{name}*")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # ---- client commands ----------------------------------------------------------------------------------
    def _run(self, cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout,
                              **kw)

    def _ok(self, cmd: list[str]) -> bool:
        return self._run(cmd).returncode == 0

    def _out(self, cmd: list[str]) -> str:
        r = self._run(cmd)
        return r.stdout if r.returncode == 0 else ""

    def _check(self, cmd: list[str], **kw) -> str:
        r = self._run(cmd, **kw)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: status {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def sbatch(self, args: list[str], cwd: Path, env: dict | None = None) -> int:
        """``sbatch --parsable ARGS`` from ``cwd`` with ``env`` (default: :attr:`env`); returns the job id."""
        out = self._check(["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})})
        return int(out.strip().split(";")[0])

    def scontrol(self, *args: str) -> str:
        """Output of ``scontrol ARGS`` (raises on a non-zero status)."""
        return self._check(["scontrol", *args])

    def scancel(self, *args: str) -> str:
        """Output of ``scancel ARGS`` (raises on a non-zero status)."""
        return self._check(["scancel", *args])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ``StdOut``, ...)."""
        line = self.scontrol("show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_job(self, job_id: int, done, timeout: float, every: float = 0.5) -> dict[str, str]:
        """Poll :meth:`job` every ``every`` s until ``done(info)``; returns the info (raises on timeout)."""
        end = time.time() + timeout
        while True:
            info = self.job(job_id)
            if done(info):
                return info
            if time.time() > end:
                raise TimeoutError(f"job {job_id} after {timeout} s: {info}")
            time.sleep(every)

    def wait_final(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until job ``job_id`` reaches one of :data:`FINAL_STATES`; returns its info."""
        return self.wait_job(job_id, lambda i: i.get("JobState") in FINAL_STATES, timeout)


def report_line(config, line: str) -> None:
    """Write ``line`` to pytest's terminal even while output is captured (timings worth keeping in CI logs)."""
    import contextlib

    reporter = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if reporter is None:
        print(line)
        return
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        reporter.write_line(line)


def make_cluster_root() -> Path:
    """A fresh, short state folder under TMPDIR (munge's socket path must stay short)."""
    return Path(tempfile.mkdtemp(prefix="pmslurm-"))
