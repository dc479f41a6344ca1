"""The layout holds: data flows one way through the layers, no process-wide switches in library code, no file
grows past one idea, and every document the tree names is in the tree (docs/architecture.md)."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "diffusers_analytic"

# Lower ranks never import higher ones; `commands` is imported only by itself and the entry point.
LAYERS = {
    "names": 0,
    "data": 0,
    "saving": 0,
    "utils": 0,
    "kernels": 1,
    "models": 2,
    "registry": 2,
    "schedulers": 3,
    "pipelines": 3,
    "evaluation": 4,
    "hub": 4,
    "distributed": 4,
    "commands": 5,
    "__main__": 5,
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts


def imported_modules(path: pathlib.Path, parts: tuple) -> list[tuple[tuple, bool]]:
    """`(module parts inside the package, inside a function?)` for every import of our own modules."""
    tree = ast.parse(path.read_text())
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)] if child.level > 1 else package
                    target = (*base, *(child.module.split(".") if child.module else ()))
                    names = [alias.name for alias in child.names] if not child.module else []
                    found.extend(((*target, name), inner) for name in names) if names else found.append(
                        (target, inner)
                    )
                elif child.module and child.module.split(".")[0] == "diffusers_analytic":
                    found.append((tuple(child.module.split(".")[1:]), inner))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "diffusers_analytic":
                        found.append((tuple(alias.name.split(".")[1:]), inner))
            visit(child, inner)

    visit(tree, False)
    return found


def layer(parts: tuple) -> int | None:
    return LAYERS.get(parts[0]) if parts else None


@pytest.mark.parametrize(
    "path, parts", list(modules()), ids=lambda value: "/".join(value) if isinstance(value, tuple) else ""
)
def test_imports_run_down_the_layers_at_module_top(path, parts):
    own = layer(parts)
    for target, in_function in imported_modules(path, parts):
        # The commands import the library inside `run`, so that `--help` does not load torch; nobody else does.
        assert not in_function or parts[0] == "commands", f"{path.name} imports {'.'.join(target)} inside a function"
        if not target or target == ("__version__",) or own is None:
            continue  # the package root (its version) and the package's own __init__
        assert target[0] != "commands" or parts[0] in ("commands", "__main__"), f"{path.name} imports the CLI"
        theirs = layer(target)
        assert theirs is not None, f"{path.name} imports {'.'.join(target)}, which has no layer"
        assert theirs <= own, f"{'.'.join(parts)} (layer {own}) imports {'.'.join(target)} (layer {theirs})"


def test_no_process_wide_switches_and_no_oversized_files():
    for path, _ in modules():
        text = path.read_text()
        assert "set_num_threads" not in text and "set_num_interop_threads" not in text, path
        assert "set_default_dtype" not in text and "torch.manual_seed" not in text, path
        assert len(text.splitlines()) <= 600, f"{path} has {len(text.splitlines())} lines"


def test_every_named_document_exists():
    # documents: `docs/<name>.md` and upper-case names such as `README.md` (not output files such as gpu_check.md)
    named = set()
    for folder in ("src", "tests", "benchmarks", "docs", "examples"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".toml", ".yaml") and path.is_file():
                named |= {
                    (path, name)
                    for name in re.findall(r"\bdocs/[A-Za-z_]+\.md\b|\b[A-Z][A-Z_]+\.md\b", path.read_text())
                }
    named |= {
        (ROOT / "README.md", name)
        for name in re.findall(r"\bdocs/[A-Za-z_]+\.md\b|\b[A-Z][A-Z_]+\.md\b", (ROOT / "README.md").read_text())
    }
    for source, name in sorted(named):
        if name == "README.md":
            continue  # (model cards and folders' own READMEs)
        candidates = [ROOT / name, ROOT / "docs" / name, ROOT / "benchmarks" / name]
        assert any(candidate.is_file() for candidate in candidates), f"{source} names {name}, which is not in the repo"


def test_the_command_line_starts_without_torch():
    """`diffusers-analytic --help` must not pay for torch / diffusers: the package root is lazy (PEP 562) and the
    command modules import the library inside `run`."""
    import subprocess
    import sys

    code = (
        "import sys, diffusers_analytic.commands.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"importing the CLI loaded {result.stdout.strip()}"


def test_names_shown_by_the_cli_match_the_library():
    from diffusers_analytic import data, names, registry

    assert names.METHODS == tuple(sorted(registry.DENOISERS)), "list a new method in names.METHODS"
    assert data.BUILTIN_DATASETS is names.BUILTIN_DATASETS
