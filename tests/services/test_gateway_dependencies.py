"""The gateway installs only what core/ and services/ need.

``requirements-gateway.lock`` (the gateway image's packages, docker/gateway.Dockerfile) must
stay exactly the run-time dependencies of ``core/`` and ``services/``: every third-party
module they import comes from it, nothing heavy (torch, Ray, transformers, scipy, ...) is
imported when the gateway's modules load, and it holds nothing beyond the transitive closure
of pyproject's ``[project] dependencies``, at requirements.lock's versions, each hashed.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[2]
GATEWAY_LOCK = REPO_ROOT / "requirements-gateway.lock"
FULL_LOCK = REPO_ROOT / "requirements.lock"
SOURCES = ("core", "services")
STUBS = REPO_ROOT / "services" / "api" / "recsys"

# Never in the gateway image: the training/offline stack and the dev tools.
FORBIDDEN_DISTRIBUTIONS = {
    "torch",
    "ray",
    "transformers",
    "pytest",
    "mypy",
    "ruff",
    "hypothesis",
    "onnx",
    "onnxruntime",
    "scipy",
    "milvus-lite",
}
# Never imported when the gateway's modules load (in the main environment, where all of
# them are installed and one stray module-level import would pull them in).
FORBIDDEN_MODULES = ("torch", "ray", "transformers", "onnx", "onnxruntime", "scipy")
GATEWAY_ENTRY_MODULES = (
    "services.gateway.__main__",
    "services.gateway.server",
    "services.gateway.servicer",
)
# Our own top-level packages: the layers, and the generated stubs (services/api puts its own
# directory on sys.path, so they import as ``recsys.v1``).
FIRST_PARTY = {"core", "services", "training", "ops", "bench", "recsys"}
# Imports inside functions that serving never calls, as (file, module, function): the
# function must import it lazily, and no services/ module may import the function.
OFFLINE_ONLY = {
    # ItemKNN neighbours: a batch job of ops/indexing; the gateway reads its results.
    ("core/behaviour.py", "scipy", "co_occurrence"),
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_entries(path: Path) -> list[str]:
    """Logical requirement lines: continuations joined, comments and blanks dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in lock_entries(path):
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"{path.name}: not an exact pin: {line[:80]!r}"
        out[normalize(match.group(1))] = match.group(2)
    return out


# --- (a) the lock itself ------------------------------------------------------------------


def test_gateway_lock_pins_and_hashes_every_package() -> None:
    entries = lock_entries(GATEWAY_LOCK)
    assert entries, f"{GATEWAY_LOCK.name} is empty"
    names = []
    for line in entries:
        match = re.fullmatch(
            r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)((?:\s+--hash=sha256:\S+)+)", line
        )
        assert match, f"{GATEWAY_LOCK.name}: needs name==version and --hash=sha256:...: {line!r}"
        hashes = re.findall(r"--hash=sha256:(\S+)", match.group(3))
        for digest in hashes:
            assert re.fullmatch(r"[0-9a-f]{64}", digest), f"{match.group(1)}: bad hash {digest}"
        names.append(normalize(match.group(1)))
    duplicated = sorted({n for n in names if names.count(n) > 1})
    assert not duplicated, f"{GATEWAY_LOCK.name}: listed twice: {duplicated}"


def test_gateway_lock_has_no_training_or_dev_packages() -> None:
    offenders = sorted(set(pins(GATEWAY_LOCK)) & FORBIDDEN_DISTRIBUTIONS)
    assert not offenders, (
        f"{GATEWAY_LOCK.name} must not install {offenders}: the gateway image needs only "
        "core/ and services/ run-time dependencies"
    )


def test_gateway_lock_versions_are_the_main_locks() -> None:
    full = pins(FULL_LOCK)
    for name, version in pins(GATEWAY_LOCK).items():
        assert name in full, f"{name} is in {GATEWAY_LOCK.name} but not in {FULL_LOCK.name}"
        assert version == full[name], (
            f"{name}: {GATEWAY_LOCK.name} pins {version}, {FULL_LOCK.name} pins {full[name]}"
        )


def _closure(roots: list[str]) -> dict[str, str]:
    """Distributions (normalised name -> the requirement that brought it) needed by
    ``roots`` on this platform, read from the installed metadata, extras followed."""
    needed: dict[str, str] = {}
    todo = [(Requirement(r), "pyproject [project] dependencies") for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, why = todo.pop()
        name = normalize(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        needed.setdefault(name, why)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (needed by {why}) is not installed in the main env")
        extras = ["", *sorted(req.extras)]
        for raw in dist.requires or []:
            dep = Requirement(raw)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append((dep, req.name))
    return needed


def test_gateway_lock_is_exactly_the_closure_of_the_base_dependencies() -> None:
    roots = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    needed = _closure(roots)
    locked = set(pins(GATEWAY_LOCK))
    missing = sorted(set(needed) - locked)
    extra = sorted(locked - set(needed))
    assert not missing, "missing from requirements-gateway.lock: " + ", ".join(
        f"{n} (required by {needed[n]})" for n in missing
    )
    assert not extra, (
        f"requirements-gateway.lock installs {extra}, which no [project] dependency needs"
    )


# --- (b) what loading the gateway imports -------------------------------------------------

# Imports every module of core/ and services/ and the gateway's entry points; a finder that
# only watches records, for each forbidden module, which of our modules asked for it (and
# through which package, when the import is indirect).
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
forbidden = set({forbidden!r})
report = {{}}


class Watch:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in forbidden and top not in report:
            frame, via = sys._getframe(1), None
            while frame is not None:
                mod = frame.f_globals.get("__name__", "")
                if mod.split(".")[0] in ("core", "services"):
                    break
                if via is None and not mod.startswith(("importlib", "_frozen")):
                    via = mod
                frame = frame.f_back
            where = frame.f_globals["__name__"] if frame is not None else "?"
            report[top] = where + (f" (through {{via}})" if via and via != where else "")
        return None


sys.meta_path.insert(0, Watch())
modules = list({entry!r})
for package in ("core", "services"):
    root = importlib.import_module(package)
    modules += [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
for name in modules:
    importlib.import_module(name)
for top in forbidden:
    if top in sys.modules and top not in report:
        report[top] = "?"
print(json.dumps({{"imported": modules, "offenders": report}}))
"""


def test_loading_the_gateway_imports_nothing_heavy() -> None:
    if not STUBS.is_dir():
        pytest.skip("gRPC stubs not generated (make proto)")
    code = _IMPORT_ALL.format(forbidden=FORBIDDEN_MODULES, entry=GATEWAY_ENTRY_MODULES)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"importing core/ and services/ failed:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.splitlines()[-1])
    assert set(GATEWAY_ENTRY_MODULES) <= set(result["imported"])
    assert len(result["imported"]) > 20, result["imported"]
    offenders = result["offenders"]
    assert not offenders, "gateway modules import training-only packages at load time: " + (
        "; ".join(f"{pkg} imported by {where}" for pkg, where in sorted(offenders.items()))
    )


# --- (c) every third-party import is locked -----------------------------------------------


def _source_files() -> Iterator[Path]:
    for package in SOURCES:
        yield from sorted((REPO_ROOT / package).rglob("*.py"))


def _imports(tree: ast.AST) -> Iterator[tuple[str, str | None, int]]:
    """(absolute module, enclosing function or None, line) of every import."""

    def visit(node: ast.AST, function: str | None) -> Iterator[tuple[str, str | None, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, function, child.lineno
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module, function, child.lineno
            inner = (
                child.name
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
                else function
            )
            yield from visit(child, inner)

    yield from visit(tree, None)


def _third_party_imports() -> dict[str, list[str]]:
    """Third-party module (as imported, dotted) -> where (file:line), offline-only ones out."""
    stdlib = set(sys.stdlib_module_names)
    found: dict[str, list[str]] = {}
    for path in _source_files():
        rel = path.relative_to(REPO_ROOT).as_posix()
        for module, function, line in _imports(ast.parse(path.read_text(), rel)):
            top = module.split(".")[0]
            if top in stdlib or top in FIRST_PARTY or top == "__future__":
                continue
            if (rel, top, function) in OFFLINE_ONLY:
                continue
            found.setdefault(module, []).append(f"{rel}:{line}")
    return found


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


@functools.cache
def _files(distribution: str) -> tuple[str, ...]:
    return tuple(str(f) for f in metadata.distribution(distribution).files or [])


def _distributions(module: str) -> list[str]:
    """Installed distributions that provide ``module`` (namespace packages such as
    ``google`` narrowed down by the files each distribution installs)."""
    parts = module.split(".")
    candidates = _packages_distributions().get(parts[0], [])
    if len(candidates) <= 1:
        return [normalize(c) for c in candidates]
    for depth in range(len(parts), 1, -1):
        prefix = "/".join(parts[:depth])
        narrowed = [
            c
            for c in candidates
            if any(f.startswith((prefix + "/", prefix + ".")) for f in _files(c))
        ]
        if narrowed:
            return sorted({normalize(c) for c in narrowed})
    return sorted({normalize(c) for c in candidates})


def test_every_third_party_import_is_in_the_gateway_lock() -> None:
    locked = set(pins(GATEWAY_LOCK))
    direct = {
        normalize(Requirement(r).name)
        for r in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
            "dependencies"
        ]
    }
    imports = _third_party_imports()
    assert {"grpc", "pymilvus", "numpy"} <= {m.split(".")[0] for m in imports}, imports
    problems = []
    for module, where in sorted(imports.items()):
        dists = _distributions(module)
        if not dists:
            problems.append(f"{module} ({where[0]}): no installed distribution provides it")
        elif not set(dists) & locked:
            problems.append(f"{module} ({where[0]}): {dists} not in {GATEWAY_LOCK.name}")
        elif not set(dists) & direct:
            problems.append(
                f"{module} ({where[0]}): {dists} imported directly but not in pyproject's "
                "[project] dependencies"
            )
    assert not problems, "core/ and services/ import what the gateway does not install:\n" + (
        "\n".join(problems)
    )


def test_offline_only_imports_stay_lazy_and_unreachable_from_services() -> None:
    for rel, module, function in sorted(OFFLINE_ONLY):
        tree = ast.parse((REPO_ROOT / rel).read_text(), rel)
        places = [(f, line) for m, f, line in _imports(tree) if m.split(".")[0] == module]
        assert places, f"{rel} no longer imports {module}: drop it from OFFLINE_ONLY"
        assert all(f == function for f, _ in places), (
            f"{rel}: {module} must be imported only inside {function}(), found at {places}"
        )
        owner = rel.removesuffix(".py").replace("/", ".")
        for path in (REPO_ROOT / "services").rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module == owner:
                    names = {a.name for a in node.names}
                    assert function not in names, (
                        f"{path.relative_to(REPO_ROOT)} imports {owner}.{function}, which needs "
                        f"{module}: not installed in the gateway image"
                    )
