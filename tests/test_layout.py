"""House rules of the layout (README, Layout): no module reaches into another module's private names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "weightshare"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    # _core: the compiled extensions each module loads for itself; dunders are Python's, not a module's
    return name.startswith("_") and not name.startswith("__") and not name.endswith("_core")


def private_uses(source: str, here: str, is_package: bool = False):
    """(line, "module.name") for each private name of another weightshare module that module ``here`` (its
    ``source``) uses: imported by name (``from weightshare.pack import _x``) or reached through an imported
    module (``pack._x``)."""
    package = here if is_package else here.rpartition(".")[0]
    tree = ast.parse(source)
    aliases = {}  # local name -> weightshare module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join((parts[:len(parts) - node.level + 1] if node.level else [])
                            + ([node.module] if node.module else []))
            if not base.startswith("weightshare"):
                continue
            for a in node.names:
                if _private(a.name) and base != here:
                    yield node.lineno, f"{base}.{a.name}"
                aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("weightshare") and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _private(node.attr) and aliases[node.value.id] != here):
            yield node.lineno, f"{aliases[node.value.id]}.{node.attr}"


def test_no_module_uses_another_modules_private_names():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} uses {name}" for path in sorted(PACKAGE.rglob("*.py"))
             for line, name in private_uses(path.read_text(), _module_name(path), path.name == "__init__.py")]
    assert not found, "make the name public in the module that owns it:\n" + "\n".join(found)


def test_the_walk_sees_each_form_of_reaching_in():
    code = ("from weightshare.pack import _secret\nfrom .. import io as wio\nfrom . import registry\n"
            "import weightshare.hub as hub\nfrom weightshare import _kmeans_core\nfrom ._own import _fine\n"
            "wio._x\nregistry._y\nhub._z\nwio.public\n")
    assert sorted(name for _, name in private_uses(code, "weightshare.merge.probe")) == [
        "weightshare.hub._z", "weightshare.io._x", "weightshare.merge._own._fine", "weightshare.merge.registry._y",
        "weightshare.pack._secret"]
