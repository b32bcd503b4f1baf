"""``polymae.patches``: each change to third-party/global state applies, fails loudly when the attribute it
patches has moved, and is undone by ``restore()`` (glibc's allocator: tests/unit/test_host_memory.py;
DeepSpeed's all-gather switch on real gloo ranks: tests/integration/test_gloo_collectives.py)."""

from __future__ import annotations

import logging
import os
import signal
import types

import pytest
import torch

from polymae import patches

pytestmark = pytest.mark.unit


def test_deepspeed_shm_comm_entry_set_and_restored(monkeypatch):
    import deepspeed.ops

    table = deepspeed.ops.__compatible_ops__
    before = table["deepspeed_shm_comm"]
    with patches.skip_deepspeed_shm_comm_build() as p:
        assert table["deepspeed_shm_comm"] is False and p.active
    assert table["deepspeed_shm_comm"] == before and not p.active
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", {"other_op": True})
    with pytest.raises(patches.PatchError, match="deepspeed_shm_comm"):
        patches.skip_deepspeed_shm_comm_build()


def test_bucketed_all_gather_guard_and_restore(monkeypatch):
    import deepspeed.comm.comm as dcomm

    monkeypatch.setattr(dcomm, "cdb", None)
    with pytest.raises(patches.PatchError, match="not initialised"):
        patches.bucketed_all_gather(True)
    monkeypatch.setattr(dcomm, "cdb", types.SimpleNamespace())  # a backend of another DeepSpeed version
    with pytest.raises(patches.PatchError, match="all_gather_function"):
        patches.bucketed_all_gather(True)

    def gather(*a):
        return "gathered"

    backend = types.SimpleNamespace(all_gather_function=gather)
    monkeypatch.setattr(dcomm, "cdb", backend)
    with patches.bucketed_all_gather(True):
        assert backend.all_gather_function is None
        with patches.bucketed_all_gather(False):  # nested: the library's function comes back
            assert backend.all_gather_function is gather
        assert backend.all_gather_function is None
    assert backend.all_gather_function is gather


def test_skip_backward_allreduce_restores_and_guards():
    engine = types.SimpleNamespace(enable_backward_allreduce=True)
    p = patches.skip_backward_allreduce(engine)
    assert engine.enable_backward_allreduce is False
    p.restore()
    p.restore()  # idempotent
    assert engine.enable_backward_allreduce is True
    with pytest.raises(patches.PatchError, match="enable_backward_allreduce"):
        patches.skip_backward_allreduce(types.SimpleNamespace())


def test_webdataset_fsspec_schemes_open_memory_urls_and_restore():
    import importlib

    import fsspec

    wg = importlib.import_module("webdataset.gopen")
    before = dict(wg.gopen_schemes)
    with fsspec.open("memory://polymae-test/blob.bin", "wb") as fh:
        fh.write(b"\x00shard bytes\xff")
    with patches.webdataset_fsspec_schemes(("memory", "s3", "gs")) as p:
        assert "memory" in wg.gopen_schemes and "s3" in wg.gopen_schemes
        assert wg.gopen_schemes["gs"] is before["gs"]  # webdataset's own handler is kept
        with wg.gopen("memory://polymae-test/blob.bin") as fh:
            assert fh.read() == b"\x00shard bytes\xff"
    assert not p.active and dict(wg.gopen_schemes) == before


def test_signal_handlers_install_and_restore():
    got = []
    previous = signal.getsignal(signal.SIGUSR1)
    with patches.signal_handlers(lambda s, f: got.append(s), (signal.SIGUSR1,)):
        os.kill(os.getpid(), signal.SIGUSR1)
    assert got == [signal.SIGUSR1]
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_global_torch_seed_reproducible_and_restored():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected_after = torch.rand(3)  # what the caller's stream yields next without the patch
    torch.set_rng_state(state)
    with patches.global_torch_seed(7):
        a = torch.rand(3)
    with patches.global_torch_seed(7):
        b = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(a, expected_after)
    assert torch.equal(torch.rand(3), expected_after)


def test_environment_sets_only_unset_and_restores(monkeypatch):
    monkeypatch.setenv("POLYMAE_TEST_SET", "user")
    monkeypatch.delenv("POLYMAE_TEST_NEW", raising=False)
    with patches.environment({"POLYMAE_TEST_SET": "ours", "POLYMAE_TEST_NEW": "1"}):
        assert os.environ["POLYMAE_TEST_SET"] == "user" and os.environ["POLYMAE_TEST_NEW"] == "1"
    assert "POLYMAE_TEST_NEW" not in os.environ
    with patches.environment({"POLYMAE_TEST_SET": "ours"}, only_unset=False):
        assert os.environ["POLYMAE_TEST_SET"] == "ours"
    assert os.environ["POLYMAE_TEST_SET"] == "user"


def test_hf_config_extras_saved_and_removed(tmp_path):
    from transformers import SegformerConfig

    cfg = SegformerConfig(num_labels=3)
    with pytest.raises(ValueError, match="polymae_"):
        patches.hf_config_extras(cfg, label_set="x")
    p = patches.hf_config_extras(cfg, polymae_label_set="ade20k-150", polymae_random_init=True)
    cfg.save_pretrained(tmp_path)
    again = SegformerConfig.from_pretrained(tmp_path)
    assert again.polymae_label_set == "ade20k-150" and again.polymae_random_init is True
    p.restore()
    assert not hasattr(cfg, "polymae_label_set") and not hasattr(cfg, "polymae_random_init")
    with pytest.raises(patches.PatchError):
        patches.hf_config_extras(object(), polymae_x=1)


def test_quiet_transformers_restores_verbosity():
    from transformers.utils import logging as tlog

    tlog.set_verbosity_info()
    with patches.quiet_transformers():
        assert tlog.get_verbosity() == tlog.ERROR
    assert tlog.get_verbosity() == tlog.INFO
    tlog.set_verbosity_warning()


def test_version_mismatch_is_logged_once(monkeypatch, caplog):
    monkeypatch.setitem(patches.WRITTEN_FOR, "torch", "0.0.1")
    monkeypatch.setattr(patches, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="polymae.patches"):
        patches.global_torch_seed(0).restore()
        patches.global_torch_seed(0).restore()
    hits = [r for r in caplog.records if "written for 0.0.1" in r.getMessage()]
    assert len(hits) == 1


def test_torchvision_io_deprecation_filter_added_and_removed():
    import warnings

    import torchvision.io  # noqa: F401 - its import adds filters of its own; count from after it

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # any torchvision.io deprecation would raise
        n = len(warnings.filters)
        p = patches.silence_torchvision_io_deprecation()
        warnings.warn(patches.TORCHVISION_IO_DEPRECATION + " since 0.29", DeprecationWarning)  # silenced
        assert len(warnings.filters) == n + 1
        p.restore()
        assert len(warnings.filters) == n
        with pytest.raises(DeprecationWarning):
            warnings.warn(patches.TORCHVISION_IO_DEPRECATION + " since 0.29", DeprecationWarning)


EXIT_SNIPPET = """
import multiprocessing as mp, signal, time, sys
from polymae import patches

def child():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a loader worker during preemption
    time.sleep(600)

if __name__ == "__main__":
    p = mp.get_context("fork").Process(target=child, daemon=True)
    p.start()
    hook = patches.kill_daemon_children_at_exit()
    if sys.argv[1] == "restored":
        hook.restore()
        p.kill()  # without the hook the test would hang in multiprocessing's exit join; end it ourselves
    print(p.pid, flush=True)
"""


@pytest.mark.parametrize("mode", ["hook", "restored"])
def test_kill_daemon_children_at_exit_lets_the_process_end(tmp_path, mode):
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(EXIT_SNIPPET)
    r = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    pid = int(r.stdout.split()[0])
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_global_rngs_seed_is_reproducible_and_restores_all_three():
    import random

    import numpy as np
    import torch

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    draws = []
    for _ in range(2):
        with patches.global_rngs_seed(2**40 + 3):
            draws.append((random.random(), np.random.rand(), torch.rand(()).item()))
    assert draws[0] == draws[1] and draws[0] != before
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == before  # the caller's streams go on


def test_numpy_global_state_is_a_private_stream():
    import numpy as np

    np.random.seed(5)
    expected_outer = np.random.rand(3)
    np.random.seed(5)
    first = np.random.rand(1)
    stream = {"seed": 11}
    with patches.numpy_global_state(stream):
        a = np.random.rand(2)
    with patches.numpy_global_state(stream):
        b = np.random.rand(2)
    rest = np.random.rand(2)  # the caller's stream goes on as if the blocks had not drawn
    assert np.array_equal(np.concatenate([first, rest]), expected_outer)
    np.random.seed(11)
    assert np.array_equal(np.concatenate([a, b]), np.random.rand(4))  # one private stream across the two blocks
