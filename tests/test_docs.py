"""Documents are for users: no "session N" narration, no paths of the machine that wrote them, and
numpydoc docstrings (Parameters / Returns) on the public functions of the core modules listed here."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Core modules whose public functions and methods carry numpydoc sections. Extend as modules are
# documented (cli, segmenter, particle_stats, prepare, frame_profile, export, detectron2_import and
# engines/factory are still to come; instances.py since BoxMasks landed).
NUMPYDOC_MODULES = [
    "nanoseg/checkpoint.py",
    "nanoseg/config_io.py",
    "nanoseg/detectron2_compat.py",
    "nanoseg/mosaic.py",
    "nanoseg/engines/__init__.py",
    "nanoseg/engines/detection_core.py",
    "nanoseg/engines/onnx_engine.py",
    "nanoseg/engines/tensorrt_engine.py",
    "nanoseg/engines/torch_engine.py",
    "nanoseg/engines/triton_engine.py",
    "nanoseg/mask_decoding.py",
    "nanoseg/mask_refiner.py",
    "nanoseg/masks.py",
    "nanoseg/particle_outline.py",
    "nanoseg/particle_skeleton.py",
    "nanoseg/model.py",
    "nanoseg/optical_density.py",
    "nanoseg/paths.py",
    "nanoseg/postprocess.py",
    "nanoseg/tiling.py",
    "offline_training/compare_models.py",
    "offline_training/interpolate.py",
]

SESSION = re.compile(r"\bsession\s+\d", re.IGNORECASE)
# A method implementing a documented interface may point to it instead (``See ``Engine.infer``.``).
IMPLEMENTS = re.compile(r"See ``[A-Z]\w*\.\w+``")
# A home directory or this project's build machines (/root, /home/x, /Users/x, /work/...), or an
# entry inside a nanoseg cache (a data set or run of one machine; the cache's documented
# layout, e.g. `~/.cache/nanoseg/runs/<name>`, stays allowed).
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:root|home|Users|work)/|\.cache/nanoseg/[\w.-]+/[\w]")


def committed_markdown() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", ".git", "node_modules"}
        return [p for p in REPO.rglob("*.md") if not skip.intersection(p.relative_to(REPO).parts)
                and ".egg-info" not in str(p)]
    return [REPO / name for name in listed if (REPO / name).is_file()]


def offending_lines(pattern: re.Pattern[str]) -> list[str]:
    return [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
            for path in committed_markdown()
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line)]


def test_the_patterns_catch_what_they_should_and_nothing_else() -> None:
    assert SESSION.search("as in Session 7, the refiner") and SESSION.search("session 12")
    assert not SESSION.search("a session of training") and not SESSION.search("sessions 4-6")
    for bad in ("`/root/.cache/nanoseg/data/paper-test-s2-n200`", "/home/alice/x.png", "see /work/main/models",
                "~/.cache/nanoseg/sweeps/augmentation_ablation_cpu/", "/Users/bob/nanoseg"):
        assert MACHINE_PATH.search(bad), bad
    for fine in ("`~/.cache/nanoseg/runs/<name>`", "`~/.cache/nanoseg/registry`", "models/default/model.pt",
                 "/srv/nanoseg/registry", "`$NANOSEG_CACHE/sweeps/<name>/`", "shared/real/ptychography_v2o5.png",
                 "cached in `~/.cache/nanoseg/refiner_samples/`"):
        assert not MACHINE_PATH.search(fine), fine


def test_committed_documents_do_not_narrate_sessions() -> None:
    assert committed_markdown(), "no Markdown found"
    assert offending_lines(SESSION) == []


def test_committed_documents_name_no_machine_paths() -> None:
    assert offending_lines(MACHINE_PATH) == []


def _needs_sections(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A function that takes nothing (beyond self/cls) and returns None needs a docstring only."""
    args = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")]
    returns_none = isinstance(fn.returns, ast.Constant) and fn.returns.value is None
    return bool(args or fn.args.vararg or fn.args.kwarg) or not returns_none


def _public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if (isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_")
                        and not any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list)):
                    found.append((f"{node.name}.{item.name}", item))
    return found


@pytest.mark.parametrize("module", NUMPYDOC_MODULES)
def test_public_functions_have_numpydoc_sections(module: str) -> None:
    tree = ast.parse((REPO / module).read_text(encoding="utf-8"))
    functions = _public_functions(tree)
    assert functions, f"{module} has no public function: take it off the list"
    missing = []
    for name, fn in functions:
        doc = ast.get_docstring(fn) or ""
        if not doc:
            missing.append(f"{name}: no docstring")
        elif (_needs_sections(fn) and not re.search(r"^\s*(Parameters|Returns|Yields)\n\s*-{3,}", doc, re.MULTILINE)
              and not ("." in name and IMPLEMENTS.search(doc))):
            missing.append(f"{name}: no Parameters or Returns section")
    assert missing == [], f"{module}: {missing}"
