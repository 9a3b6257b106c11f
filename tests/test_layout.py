"""The code's shape, checked: the launcher plans without torch; the project's modules import each other
without cycles; a function-local import of a project module only defers a heavy dependency, and says so;
no comment or docstring sends the reader to an issue number or to a file outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cpu_env

PACKAGES = ("dpo_dist", "launch")
SOURCES = sorted(p for pkg in (*PACKAGES, "bench", "tests") for p in (ROOT / pkg).rglob("*.py")
                 if "habana_shim" not in p.parts)
# A deferred project import names the heavy dependency it defers in a comment on its line.
DEFERS = re.compile(r"#.*\b(deferred|torch|transformers|habana|optimum|peft|deepspeed|matplotlib|trl)\b", re.I)


def module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path):
    """(line, imported module, at module level?) for every import of a dpo_dist / launch module in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    top |= {id(n) for n in ast.walk(tree) if isinstance(n, ast.If) and id(n) in top for n in n.body}
    me = module_name(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and name != me:
                out.append((node.lineno, name, id(node) in top))
    return out


def known_module(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_plan_imports_no_torch():
    code = ("import sys\nfrom launch.cli import main\n"
            "rc = main(['plan', '--model', 'meta-llama/Llama-3-70B', '--hardware', 'gaudi2', '--cards', '8'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'trl', 'peft') if m in sys.modules)\n"
            "print('HEAVY', heavy, rc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY [] 0" in res.stdout, res.stdout[-2000:]


def test_no_import_cycles_between_project_modules():
    files = [p for p in SOURCES if p.parts[len(ROOT.parts)] in PACKAGES]
    modules = {module_name(p): p for p in files}
    graph = {m: set() for m in modules}
    for m, p in modules.items():
        for _, name, _ in project_imports(p):
            dep = known_module(name, set(modules))
            if dep and dep != m:
                graph[m].add(dep)
    # Tarjan-free cycle search: depth-first, report the first cycle found from each module.
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_function_local_project_imports_only_defer_heavy_dependencies():
    offenders = []
    for p in SOURCES:
        if p.parts[len(ROOT.parts)] not in PACKAGES:
            continue
        lines = p.read_text().splitlines()
        for lineno, name, at_top in project_imports(p):
            if not at_top and not DEFERS.search(lines[lineno - 1]):
                offenders.append(f"{p.relative_to(ROOT)}:{lineno}: {name}")
    assert not offenders, ("function-local imports of project modules without a comment naming the heavy "
                           "dependency they defer:\n" + "\n".join(offenders))


CITATION = re.compile(r"\b[Ii]ssue\s+\d+|DESIGN\.md|§\s?\d")


@pytest.mark.parametrize("kind", ["code", "docs"])
def test_nothing_cites_an_issue_or_a_file_outside_the_repository(kind):
    if kind == "code":
        files = SOURCES
    else:
        files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "Dockerfile", *ROOT.glob("*/README.md"),
                 *ROOT.glob("docs/*.md"), *(ROOT / ".ci").glob("*")]
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}"
            for p in files if p.is_file() and p.name != "test_layout.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if CITATION.search(line)]
    assert not hits, "\n".join(hits)


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (no packages under tests/): two files of one name stop the
    whole suite at collection ("import file mismatch")."""
    seen: dict[str, Path] = {}
    for f in sorted((ROOT / "tests").rglob("test_*.py")):
        assert f.name not in seen, f"{f.relative_to(ROOT)} and {seen[f.name].relative_to(ROOT)} share a name"
        seen[f.name] = f
