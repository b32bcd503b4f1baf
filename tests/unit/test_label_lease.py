"""The label job's output lease (pipeline/label/lease.py) on a local folder: a fresh lease of another run is
refused, a stale or dead one is taken over, the heartbeat renews it, and a run whose lease was taken over notices.
The same code runs on S3 in tests/integration/test_label_s3.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from polymae.pipeline.label.lease import LeaseHeld, OutputLease, lease_url

pytestmark = pytest.mark.unit


def _foreign(split, **kw) -> dict:
    """Write a lease of another run (another host unless ``host`` is given) into ``split``."""
    record = {"owner": "someone", "host": "node-7", "pid": 4242, "token": "f" * 32, "acquired": time.time(),
              "heartbeat": time.time(), "ttl_s": 60.0, **kw}
    split.mkdir(parents=True, exist_ok=True)
    (split / "lease.tmp").write_text(json.dumps(record))
    os.replace(split / "lease.tmp", split / ".label-lease.json")  # atomic, as every lease write is
    return record


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_fresh_lease_of_another_run_is_refused(tmp_path):
    split = tmp_path / "train"
    _foreign(split)
    with pytest.raises(LeaseHeld, match=r"another label run holds .*\.label-lease\.json \(someone@node-7 pid 4242, "
                                        r"heartbeat \d+ s ago\)"):
        OutputLease(str(split), ttl_s=60).acquire()
    assert json.loads((split / ".label-lease.json").read_text())["token"] == "f" * 32  # untouched


@pytest.mark.parametrize("stale", ["expired", "dead_process_on_this_host"])
def test_a_stale_lease_is_taken_over(tmp_path, stale):
    split = tmp_path / "train"
    if stale == "expired":  # another host, no heartbeat for longer than its ttl
        _foreign(split, heartbeat=time.time() - 61)
    else:  # fresh heartbeat, but its process on this host is gone (a killed run)
        _foreign(split, host=socket.gethostname(), pid=_dead_pid())
    with OutputLease(str(split), ttl_s=60) as lease:
        held = json.loads((split / ".label-lease.json").read_text())
        assert held["token"] == lease.token and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not (split / ".label-lease.json").exists()


def test_heartbeat_renews_and_a_takeover_is_noticed(tmp_path):
    split = tmp_path / "train"
    split.mkdir()
    lease = OutputLease(str(split), ttl_s=0.4).acquire()  # beats every 0.1 s
    try:
        first = json.loads((split / ".label-lease.json").read_text())["heartbeat"]
        deadline = time.time() + 20
        while json.loads((split / ".label-lease.json").read_text())["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat was never renewed"
            time.sleep(0.05)
        # a second run of this process may not take it while it beats
        with pytest.raises(LeaseHeld):
            OutputLease(str(split), ttl_s=60).acquire()
        _foreign(split)  # another run took it over (ours had expired)
        deadline = time.time() + 20
        while not lease.lost:
            assert time.time() < deadline, "the takeover was not noticed"
            time.sleep(0.05)
    finally:
        lease.release()
    assert json.loads((split / ".label-lease.json").read_text())["token"] == "f" * 32  # not ours: left alone
    assert lease_url(str(split)) == str(split / ".label-lease.json")
