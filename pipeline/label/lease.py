"""A lease on a label job's output split, so that two drivers never label into the same ``{output}/{split}``.

The lease is a small JSON file, ``{output}/{split}/.label-lease.json`` (hidden: readers and the shard
listings ignore it): ``owner`` (user), ``host``, ``pid``, ``token`` (unique per run), ``acquired`` and
``heartbeat`` (unix seconds). The run holding it rewrites ``heartbeat`` every ``ttl_s / 4`` seconds from
a daemon thread and deletes the file when it ends. Another run refuses the split while the lease is
*fresh*: its heartbeat is younger than ``ttl_s`` and, when it was written on this host, its process is
still alive (a killed run on the same machine releases the split at once; elsewhere its lease expires
after ``ttl_s``).

Acquiring is write-then-read-back: two runs starting within the same instant could both write, and the
one whose token is not read back refuses. Object stores give no stronger primitive that every fsspec
backend shares, and the rare double start is still caught before any shard is written.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
import uuid

from polymae.datasets import storage

log = logging.getLogger("polymae.label")

LEASE_NAME = ".label-lease.json"


class LeaseHeld(RuntimeError):
    """Another run holds a fresh lease on the output; the message names its owner, host, pid and age."""


def lease_url(split_url: str) -> str:
    """``{split_url}/.label-lease.json``."""
    return f"{split_url.rstrip('/')}/{LEASE_NAME}"


def _pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return str(os.getuid())


class OutputLease:
    """The lease of one run on ``split_url`` (see the module docstring); a context manager that acquires
    on enter and releases on exit.

    Args:
        split_url: ``{output}/{split}`` (path or fsspec URL).
        ttl_s: seconds after its last heartbeat that another run's lease counts as abandoned.
    """

    def __init__(self, split_url: str, ttl_s: float = 120.0):
        self.url = lease_url(split_url)
        self.ttl_s = float(ttl_s)
        self.token = uuid.uuid4().hex
        self.record = {"owner": _user(), "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "acquired": time.time(), "heartbeat": time.time(), "ttl_s": self.ttl_s}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _read(self) -> dict | None:
        """The lease file as the store holds it now (not a cached listing), or None."""
        if not storage.exists_fresh(self.url):
            return None
        try:
            return storage.read_json(self.url)
        except (FileNotFoundError, ValueError):  # released meanwhile, or a torn write of a foreign tool
            return None

    def holder_if_fresh(self, other: dict | None) -> str | None:
        """A description of ``other``'s lease when it is another run's and still fresh, else None."""
        if not other or other.get("token") == self.token:
            return None
        age = time.time() - float(other.get("heartbeat", 0))
        if age >= float(other.get("ttl_s", self.ttl_s)):
            return None
        if other.get("host") == self.record["host"] and not _pid_alive(int(other.get("pid", -1))):
            return None
        return (f"{other.get('owner', '?')}@{other.get('host', '?')} pid {other.get('pid', '?')}, heartbeat "
                f"{age:.0f} s ago")

    def acquire(self) -> "OutputLease":
        """Take the lease and start the heartbeat.

        Raises:
            LeaseHeld: another run's lease is fresh (or it won a simultaneous start); naming its owner,
            host, pid and heartbeat age.
        """
        holder = self.holder_if_fresh(self._read())
        if holder is None:
            self._write()
            holder = self.holder_if_fresh(self._read())
        if holder is not None:
            raise LeaseHeld(f"{self.url.rsplit('/', 2)[-2]}: another label run holds {self.url} ({holder}); "
                            f"wait for it to finish, or, if it is dead, delete the file or wait {self.ttl_s:g} s "
                            "(lease_ttl_s) after its last heartbeat")
        self._thread = threading.Thread(target=self._beat, name="label-lease", daemon=True)
        self._thread.start()
        log.info("holding the lease %s", self.url)
        return self

    def _write(self) -> None:
        self.record["heartbeat"] = time.time()
        storage.write_json_atomic(self.url, self.record)

    def _beat(self) -> None:
        """Rewrite the heartbeat every ``ttl_s / 4`` seconds until released; a lease taken over by another
        run (ours expired, e.g. the driver was suspended) is logged and no longer renewed."""
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current is not None and current.get("token") != self.token:
                    self.lost = True
                    log.error("the lease %s was taken over by %s@%s pid %s; this run no longer holds the output",
                              self.url, current.get("owner"), current.get("host"), current.get("pid"))
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                log.warning("could not renew the lease %s: %s: %s", self.url, type(e).__name__, e)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still this run's (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            current = self._read()
            if current is not None and current.get("token") == self.token:
                storage.remove(self.url)
        except Exception as e:  # noqa: BLE001 - the lease then expires after ttl_s
            log.warning("could not release the lease %s: %s: %s", self.url, type(e).__name__, e)

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
