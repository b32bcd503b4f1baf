"""The package layout and its rules (docs/ARCHITECTURE.md, "Import rules"): polymae.* from any directory,
Hugging Face `datasets` never shadowed, arrows pointing down, job sub-packages apart, docstrings, small
functions, tier markers, and an architecture note whose names all exist."""

import ast
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE_FOLDERS = ("models", "datasets", "pipeline", "jobs")

# The job sub-packages of pipeline/ (a module or a folder each). They do not import each other, except where one
# job consumes another's output format, and then only the named public functions listed here.
PIPELINE_JOBS = ("label", "train", "evaluate", "publish")
CROSS_JOB_IMPORTS = {
    # evaluate and publish read what training writes: a run folder's checkpoint and metrics.
    ("evaluate", "polymae.pipeline.train.checkpoint"): {"load_encoder", "load_model", "read_model_config",
                                                       "weights_digest"},
    ("publish", "polymae.pipeline.train.checkpoint"): {"ENCODER_FILE", "MODEL_CONFIG", "MODEL_FILE", "consolidate",
                                                      "read_model_config", "weights_digest"},
    ("publish", "polymae.pipeline.train.metrics_log"): {"read_metrics"},
    ("publish", "polymae.pipeline.evaluate.results"): {"read_table"},  # the model card's rows of the results table
}
MAX_FUNCTION_LINES = 80


def _py_files(*folders: str):
    for folder in folders:
        for root, dirs, files in os.walk(os.path.join(REPO, folder)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO), ast.parse(open(path).read())


def _imports(tree: ast.AST):
    """``(module, [names])`` of every import in ``tree`` (names empty for ``import x``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or "", [a.name for a in node.names]


def _job_of(module: str) -> str | None:
    """``label`` for ``polymae.pipeline.label.driver``, ``publish`` for ``polymae.pipeline.publish``."""
    parts = module.split(".")
    if len(parts) >= 3 and parts[:2] == ["polymae", "pipeline"] and parts[2] in PIPELINE_JOBS:
        return parts[2]
    return None


@pytest.mark.parametrize("cwd", [REPO, "/"])
def test_imports_from_any_directory(cwd):
    code = ("import polymae.models, polymae.datasets.shards, polymae.pipeline.config, polymae.pipeline.label.driver,"
            "polymae.pipeline.train.trainer, polymae.pipeline.evaluate.metrics, polymae.jobs.cli, datasets;"
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
    """jobs -> pipeline -> datasets -> models -> (torch, timm); never upwards."""
    forbidden = {"models": ("polymae.datasets", "polymae.pipeline", "polymae.jobs"),
                 "datasets": ("polymae.pipeline", "polymae.jobs"),
                 "pipeline": ("polymae.jobs",)}
    bad = []
    for folder, banned in forbidden.items():
        for rel, tree in _py_files(folder):
            bad += [f"{rel} imports {m}" for m, _ in _imports(tree) if m.startswith(banned)]
    # patches.py sits below every layer (datasets and pipeline both use it)
    tree = ast.parse(open(os.path.join(REPO, "patches.py")).read())
    bad += [f"patches.py imports {m}" for m, _ in _imports(tree) if m.startswith("polymae.")]
    assert bad == []


def test_pipeline_jobs_do_not_import_each_other():
    """A job sub-package imports another only through the named public functions in CROSS_JOB_IMPORTS;
    pipeline's shared modules (config, patches) import no job sub-package."""
    bad = []
    for rel, tree in _py_files("pipeline"):
        parts = rel[:-3].split(os.sep)
        own = parts[1] if len(parts) > 1 and parts[1] in PIPELINE_JOBS else None
        for module, names in _imports(tree):
            other = _job_of(module)
            if other is None or other == own:
                continue
            if own is None:
                bad.append(f"{rel} (shared) imports job module {module}")
                continue
            allowed = CROSS_JOB_IMPORTS.get((own, module))
            if allowed is None or not names or not set(names) <= allowed:
                bad.append(f"{rel} ({own}) imports {module} {names}")
    assert bad == []


def test_cross_job_imports_name_public_functions_that_exist():
    import importlib

    for (_, module), names in CROSS_JOB_IMPORTS.items():
        mod = importlib.import_module(module)
        for name in names:
            assert not name.startswith("_") and hasattr(mod, name), f"{module}.{name}"


def test_public_functions_and_classes_have_docstrings():
    missing = []
    files = list(_py_files(*CODE_FOLDERS)) + [("patches.py", ast.parse(open(os.path.join(REPO, "patches.py")).read()))]
    for rel, tree in files:
        missing += [f"{rel}:{n.lineno} {n.name}" for n in tree.body
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
                    and not ast.get_docstring(n)]
    assert missing == []


def test_no_long_functions_in_pipeline():
    long = []
    for rel, tree in _py_files("pipeline"):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_every_test_file_has_a_tier_marker():
    missing = []
    for rel, tree in _py_files("tests"):
        if not os.path.basename(rel).startswith("test_"):
            continue
        text = open(os.path.join(REPO, rel)).read()
        if not re.search(r"pytestmark\s*=\s*(\[[^\]]*)?pytest\.mark\.(unit|integration|e2e)", text):
            missing.append(rel)
    assert missing == []


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in out.stdout.splitlines() if os.path.exists(os.path.join(REPO, f))]


def test_nothing_refers_to_files_outside_the_repository():
    pattern = re.compile(r"DESIGN\.md|\.\./shared|/work/")
    bad = []
    for rel in _tracked_files():
        if rel.endswith((".py", ".md", ".sh", ".sbatch", ".yaml", ".toml", ".cfg")):
            for i, line in enumerate(open(os.path.join(REPO, rel), errors="replace"), 1):
                if pattern.search(line) and rel != "tests/unit/test_layout.py":
                    bad.append(f"{rel}:{i}: {line.strip()[:100]}")
    assert bad == []


def test_architecture_note_names_exist():
    """Every repository path the note names in backticks (``pipeline/label/driver.py``, ``slurm/``) exists."""
    text = open(os.path.join(REPO, "docs", "ARCHITECTURE.md")).read()
    names = set(re.findall(r"`([A-Za-z_][\w./-]*(?:/|\.py|\.sh|\.sbatch|\.md|\.toml|\.yaml))`", text))
    roots = ("models/", "datasets/", "pipeline/", "jobs/", "tests/", "benchmarks/", "slurm/", "scripts/", "docs/",
             "README.md", "pyproject.toml", ".ci/")
    checked = sorted(n for n in names if n.startswith(roots))
    assert len(checked) >= 20, checked
    missing = [n for n in checked if not os.path.exists(os.path.join(REPO, n))]
    assert missing == []
