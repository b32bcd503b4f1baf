"""``polymae.patches.keep_freed_host_memory``: a large block freed and allocated again must not be page-faulted
anew; after ``restore()`` glibc maps and faults it again as by default."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# Allocate, touch and free a 64 MiB tensor (above glibc's mmap threshold) 16 times, as a training step does
# with its flat buffers; print the minor page faults of the last 4 rounds (steady state: with the heap
# kept, the first rounds still grow it while aligned blocks find their place). Run in a fresh interpreter so
# the allocator setting starts from glibc's default. "restored": after restore(), blocks larger than any the
# heap kept (128 MiB) must be mapped and faulted afresh every round again, as by default (the 64 MiB blocks the
# heap already holds may stay reusable: restore() cannot move what glibc has in its bins).
SNIPPET = """
import resource, sys, torch
from polymae.patches import keep_freed_host_memory
patch = keep_freed_host_memory() if sys.argv[1] in ("keep", "restored") else None
ok = patch is not None
for _ in range(12):
    x = torch.ones(16 * 2**20); del x
n = 16 * 2**20  # 16 Mi float32 = 64 MiB
if sys.argv[1] == "restored":
    patch.restore()
    n *= 2
    for _ in range(2):
        x = torch.ones(n); del x
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x = torch.ones(n)
    del x
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SNIPPET, mode], capture_output=True, text=True, check=True)
    ok, faults = out.stdout.split()
    return ok, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_blocks_are_reused_without_page_faults():
    ok, kept = _faults("keep")
    _, default = _faults("default")
    assert ok == "True"
    pages = 4 * 64 * 2**20 // 4096  # 65,536 pages if every round maps fresh memory
    assert default > pages // 2, default  # glibc default: each 64 MiB block is mmap'ed and faulted again
    assert kept < pages // 50, kept  # kept: the same heap block is reused, already resident
    ok, restored = _faults("restored")
    assert ok == "True" and restored > pages // 2, restored  # restore(): glibc's defaults are back
