"""The package's layout: layers only point down (no import cycle), files stay short.

Read from the source with ``ast`` (nothing is imported): every ``import`` of a dvp_jax module,
at module level or inside a function, is an edge of the import graph.
"""
import ast
import os

import dvp_jax

PACKAGE_DIR = os.path.dirname(dvp_jax.__file__)
MAX_LINES = 400


def _modules() -> dict[str, str]:
    """{dotted module name: file path} of every module of the package."""
    found = {}
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE_DIR))
                name = rel[:-3].replace(os.sep, ".")
                found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = (
                    os.path.join(root, f))
    return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The dvp_jax modules that module ``name`` imports anywhere in its file."""
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # Relative: resolve against this module's package.
                parts = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            # 'from pkg import mod' imports pkg.mod; 'from mod import obj' imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # 'import dvp_jax.a.b' of a non-module.
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of ``graph`` or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_finds_module_and_function_level_imports():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "dvp_jax.input.sources" in graph["dvp_jax.input.pipeline"]  # Module level.
    assert "dvp_jax.input.sources" in graph["dvp_jax.loop"]  # Inside a function.
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_file_over_400_lines():
    sizes = {}
    for path in _modules().values():
        with open(path, encoding="utf-8") as f:
            sizes[os.path.relpath(path, PACKAGE_DIR).replace(os.sep, "/")] = len(f.readlines())
    over = {p: n for p, n in sizes.items() if n > MAX_LINES}
    assert not over, f"files over {MAX_LINES} lines (split them): {over}"


def test_every_registered_trainer_and_experiment_module_has_its_entry_points():
    from dvp_jax import registry
    modules = _modules()
    for name, module in registry.TRAINERS.items():
        assert module in modules, f"config.trainer={name!r}: no module {module}"
        with open(modules[module], encoding="utf-8") as f:
            tree = ast.parse(f.read())
        assert any(isinstance(n, ast.FunctionDef) and n.name == "train" for n in tree.body), (
            f"config.trainer={name!r}: {module} defines no train(config, workdir, mesh)")
    for name, module in registry.EXPERIMENTS.items():
        assert module in modules, f"config.experiment={name!r}: no module {module}"
        with open(modules[module], encoding="utf-8") as f:
            defined = {n.name for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
        assert {"run", "describe"} <= defined, f"config.experiment={name!r}: {module}"
        # An experiment runs trainings through the public call, not a trainer module directly.
        assert "dvp_jax.train" in _imports(module, modules[module], modules)
        assert not any(m.startswith("dvp_jax.trainers") for m in
                       _imports(module, modules[module], modules)), module
    # A leaf: the modules that read it (config_checks, train, main) import nothing for it.
    assert _imports("dvp_jax.registry", modules["dvp_jax.registry"], modules) == set()
    assert _imports("dvp_jax.errors", modules["dvp_jax.errors"], modules) == set()


def test_every_error_class_is_a_user_error():
    """One user-error path: each ``*Error`` class of the package derives from errors.UserError
    (the command lines print those in one line and exit 2)."""
    bases = {}
    for path in _modules().values():
        with open(path, encoding="utf-8") as f:
            for node in ast.walk(ast.parse(f.read())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    bases[node.name] = [ast.unparse(b).rpartition(".")[2] for b in node.bases]

    def is_user_error(name, seen=()):
        return name == "UserError" or any(
            b in bases and b not in seen and is_user_error(b, seen + (name,)) for b in bases[name])

    assert len(bases) > 10
    assert not [n for n in bases if not is_user_error(n)]
