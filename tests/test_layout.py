"""The tree shows the architecture: layers protos <- shared <- {client, server}, every CLI in a commands/ folder,
the packaged folders are the tree's folders, and the Flower app bundle declares every run setting.

Static checks over the source (AST), so they hold whether or not a module can be imported here.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"protos": "mos.protos", "shared": "mos.shared", "client": "mos.client", "server": "mos.server"}
# what each layer may import from the project
ALLOWED = {"protos": {"protos"}, "shared": {"protos", "shared"}, "client": {"protos", "shared", "client"},
           "server": {"protos", "shared", "server"}}


def modules() -> dict[Path, str]:
    """source file -> its module name, for every module of the package."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder)
            if "flwr_app" in rel.parts:  # the app bundle Flower ships: not part of the package
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[f] = ".".join([pkg, *parts])
    return out


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import, relative ones resolved; plus string arguments to
    importlib.import_module / __import__ (an import written as a string still reaches up)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fname in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def layer_of(name: str) -> str | None:
    for folder, pkg in PACKAGES.items():
        if name == pkg or name.startswith(pkg + "."):
            return folder
    return None


def test_layers_protos_shared_then_client_and_server():
    bad = []
    for f, module in modules().items():
        layer = layer_of(module)
        tree = ast.parse(f.read_text(), str(f))
        for line, name in imported(tree, module, f.name == "__init__.py"):
            target = layer_of(name)
            if target and target not in ALLOWED[layer]:
                bad.append(f"{f.relative_to(REPO)}:{line} ({layer}) imports {name} ({target})")
    assert not bad, "imports against the layers protos <- shared <- {client, server}:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation():
    """The layering check itself: an upward import, relative or as a string, is caught."""
    src = "from ...client.tuning import tune\nimport importlib\nimportlib.import_module('mos.server.state')\n"
    names = [n for _, n in imported(ast.parse(src), "mos.shared.sd.base", False)]
    assert "mos.client.tuning" in names and "mos.server.state" in names
    assert layer_of("mos.client.tuning") not in ALLOWED["shared"]


def test_every_cli_lives_in_a_commands_folder():
    """Modules with a `main(argv)`, a `register(sub)` (a `mos` subcommand) or an ArgumentParser are in commands/;
    console scripts and `mos` subcommands point there."""
    for f, module in modules().items():
        tree = ast.parse(f.read_text(), str(f))
        top = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        cli = ("main" in top and [a.arg for a in top["main"].args.args] in ([], ["argv"])) or ("register" in top and [a.arg for a in top["register"].args.args] == ["sub"]) \
            or "ArgumentParser" in f.read_text()
        if cli:
            assert ".commands." in module, f"{module} is a CLI outside a commands/ folder"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    targets = list(project["scripts"].values()) + list(project["entry-points"]["mos.commands"].values())
    assert targets and all(".commands." in t for t in targets), targets
    tree_modules = set(modules().values())
    for t in targets:
        assert t.split(":")[0] in tree_modules, f"entry point {t} names no module in the tree"


def test_packaged_folders_are_the_tree_folders():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {m for f, m in modules().items() if f.name == "__init__.py"}
    assert listed == on_disk, f"pyproject lists {sorted(listed - on_disk)} not on disk; on disk but not listed: " \
                              f"{sorted(on_disk - listed)}"


def test_no_module_cites_documents_outside_the_repository():
    for f in modules():
        text = f.read_text()
        for cite in ("DESIGN §", "DESIGN.md", "docs/stack.md", "STACK.md"):
            assert cite not in text, f"{f.relative_to(REPO)} cites {cite!r}, which is not in the repository"


def test_the_app_bundle_declares_every_run_setting_with_mos_server_defaults():
    from mos.server.settings import Settings
    from mos.shared.fusion.config import FusionConfig

    declared = tomllib.loads((REPO / "server" / "flwr_app" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    config = declared["config"]
    ours = Settings("mos-out/server", "mos-state/server").run_config()
    assert config == ours
    assert Settings.from_run_config(config) == Settings("mos-out/server", "mos-state/server")
    assert Settings.from_run_config({**config, "eps": -1.0}).fusion.eps is None  # < 0: λ per site by GCV
    assert Settings(".", ".", fusion=FusionConfig(eps=None)).run_config()["eps"] == -1.0
    assert Settings.from_run_config({**config, "kv-eps": 0.3}).fusion.kv_eps == 0.3  # < 0 (default): the base's
    assert Settings.from_run_config(config).fusion.kv_eps is None
    assert Settings.from_run_config(config).fusion.heldout is None  # "base": the base's own default
    assert Settings.from_run_config({**config, "heldout": "true"}).fusion.heldout is True
    assert Settings(".", ".", fusion=FusionConfig(heldout=False)).run_config()["heldout"] == "false"
    with pytest.raises(ValueError, match="heldout='maybe'"):
        Settings.from_run_config({**config, "heldout": "maybe"})
    with pytest.raises(ValueError, match="sample-steps"):
        Settings.from_run_config({**config, "sample-steps": "many"})
    with pytest.raises(ValueError, match="lacks 'rounds'"):
        Settings.from_run_config({k: v for k, v in config.items() if k != "rounds"})


def test_public_api_names_resolve():
    """Each package's __init__ names what a library user imports; every name it lists is there."""
    import importlib

    for pkg in ("mos.shared", "mos.client", "mos.server"):
        mod = importlib.import_module(pkg)
        assert mod.__all__, pkg
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"{pkg}.{name}"
        with pytest.raises(AttributeError):
            getattr(mod, "no_such_name")


def test_readme_library_example_runs(tmp_path, monkeypatch):
    """The README's library example, on the tiny base with a few steps (the same calls, smaller numbers)."""
    readme = (REPO / "README.md").read_text()
    code = readme.split("As a library:\n\n```python\n", 1)[1].split("```", 1)[0]
    small = (code.replace('"world"', '"tiny"').replace("TuneConfig()", "TuneConfig(steps=2)")
             .replace("FusionConfig()", "FusionConfig(sample_steps=2)").replace('"data/', f'"{REPO}/data/'))
    assert small != code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(small, "README.md", "exec"), scope)
    assert scope["picture"].size == (64, 64)
    assert [c.name for c in scope["fused"].concepts] == ["alice", "bob"]
