"""The package layout: polymae.* from any directory, and Hugging Face `datasets` never shadowed."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("cwd", [REPO, "/"])
def test_imports_from_any_directory(cwd):
    code = ("import polymae.models, polymae.datasets.shards, polymae.pipeline.config, polymae.jobs.cli, datasets;"
            "import os; print(os.path.dirname(datasets.__file__ or ''))")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hf_dir = r.stdout.strip().splitlines()[-1]
    # Hugging Face `datasets` lives in site-packages, never in polymae's datasets/ folder
    assert "site-packages" in hf_dir and os.path.realpath(hf_dir) != os.path.realpath(os.path.join(REPO, "datasets"))


def test_console_script_lists_jobs():
    exe = os.path.join(os.path.dirname(sys.executable), "polymae")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for job in ("label", "pretrain", "evaluate", "publish", "quickstart"):
        assert job in r.stdout
