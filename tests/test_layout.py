"""The package's layout (DESIGN.md): imports point down the layers and never in a circle, no module reads a
private name of another, every subpackage says its job, and `import klalign.theory` loads no torch."""

import ast
import subprocess
import sys
from pathlib import Path

import klalign

PACKAGE = Path(klalign.__file__).parent

# Bottom up; a module may import from its own layer or below (DESIGN.md).
LAYERS = [
    ("klalign.errors", "klalign.internals", "klalign.theory", "klalign.ops"),
    ("klalign.config", "klalign.data", "klalign.models"),
    ("klalign.generation", "klalign.oracles", "klalign.runs"),
    ("klalign.trainers", "klalign.inference"),
    ("klalign.evaluation", "klalign.testbed"),
    ("klalign.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for f in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(klalign module imported, names taken from it, line) for every import in the file, at any depth
    (a function-level import counts: it runs too)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("klalign")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("klalign"):
                continue
            submodules = [a.name for a in node.names if f"{base}.{a.name}" in known]
            found += [(f"{base}.{name}", [], node.lineno) for name in submodules]
            names = [a.name for a in node.names if a.name not in submodules]
            if names or not submodules:
                found.append((base, names, node.lineno))
    return found


def resolve(name: str, known: dict[str, Path]) -> str:
    while name not in known:
        name = name.rpartition(".")[0]
    return name


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {m: set() for m in known}
    for m, path in known.items():
        for target, _, _ in imports(path, known):
            target = resolve(target, known)
            if target not in (m, "klalign"):
                edges[m].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles among klalign's modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    for module in modules():
        if module != "klalign":
            layer(module)  # every module has a layer
    upward = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, targets in graph().items() if m != "klalign"
              for t in targets if layer(t) > layer(m)]
    assert not upward, "imports against the layers: " + "; ".join(sorted(upward))


def test_no_module_imports_a_private_name_of_another():
    known = modules()
    private = [f"{module_name(path)}:{line} takes {name} from {target}"
               for path in known.values() for target, names, line in imports(path, known)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "; ".join(private)


def test_every_subpackage_states_its_job():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 8, f"{init}: a docstring saying what the subpackage is for"


def test_light_imports():
    """`import klalign` and `import klalign.theory` (numpy only) load none of torch, transformers, TRL, PEFT."""
    code = ("import sys, klalign, klalign.theory; heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'deepspeed'}); print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import klalign.theory loaded {out}"


def test_every_public_name_resolves_lazily():
    code = ("import sys, klalign; names = klalign.__all__; [getattr(klalign, n) for n in names]; "
            "print(len(names), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == len(klalign.__all__) and out[1] == "True"
