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


def test_layering_arrows_point_down():
    """DESIGN.md: models -> (torch, timm); datasets -> models; pipeline -> models, datasets; never upwards."""
    import ast

    forbidden = {"models": ("polymae.datasets", "polymae.pipeline", "polymae.jobs"),
                 "datasets": ("polymae.pipeline", "polymae.jobs"),
                 "pipeline": ("polymae.jobs",)}
    bad = []
    for folder, banned in forbidden.items():
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if not name.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(REPO, folder, name)).read())
            for node in ast.walk(tree):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                bad += [f"{folder}/{name} imports {m}" for m in mods if m.startswith(banned)]
    assert bad == []


def test_public_functions_and_classes_have_docstrings():
    import ast

    missing = []
    for folder in ("models", "datasets", "pipeline", "jobs"):
        for name in sorted(os.listdir(os.path.join(REPO, folder))):
            if name.endswith(".py"):
                tree = ast.parse(open(os.path.join(REPO, folder, name)).read())
                missing += [f"{folder}/{name}:{n.lineno} {n.name}" for n in tree.body
                            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
                            and not ast.get_docstring(n)]
    assert missing == []
