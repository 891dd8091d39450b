"""The dependency direction of DESIGN §1, checked on the source: `api`, `transport` -> `actors` -> `storage`.

Imports are read with `ast` (nothing is imported), so a wrong import is caught even in a module no test loads,
including imports under `if TYPE_CHECKING:` and inside functions. Also: only `api/settings.py` reads the
environment, so every other module gets its configuration passed down from the composition root (bench/, a
harness that launches servers as child processes, is exempt from that rule).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "runtime", "actors", "transport", "storage", "api", "client", "bench")

# package -> module prefixes it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "protocol": ("actors", "transport", "storage", "api", "client", "bench"),  # pure: both sides import it
    # Concurrency primitives (a sleeper, a timer heap) under actors/ and transport/: they know nothing of ours.
    "runtime": ("protocol", "actors", "transport", "storage", "api", "client", "bench"),
    "actors": ("transport", "api", "client"),
    "storage": ("actors", "transport", "api", "client"),
    "transport": ("api",),
    # The Python SDK ships alone as `sessiond-client` (clients/python): it may import only `protocol` and itself.
    "client": ("api", "transport", "storage", "actors", "bench"),
}
# Transport and api reach actors only through the router and the messages/references it deals in (DESIGN §1, §6):
# package -> the only modules of `actors` it may import.
ACTORS_VIA: dict[str, tuple[str, ...]] = {
    "transport": ("actors.messages", "actors.router"),
    "api": ("actors.messages", "actors.router", "actors.registry", "actors.session", "actors.config",
            "actors.leases"),
}
ENV_READER = "api/settings.py"
# The environment rule is about the product's configuration. bench/ is a harness that starts servers as child
# processes and legitimately builds their environment from its own.
ENV_PACKAGES = ("actors", "transport", "storage", "api", "client")
ENV_NAMES = frozenset({"environ", "environb", "getenv", "getenvb"})


def module_name(path: Path, root: Path = ROOT) -> str:
    """Dotted name of a source file under `root` (`pkg/__init__.py` -> `pkg`)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every absolute module name `source` imports, relative imports resolved against `module`.

    `from a.b import c` yields both `a.b` and `a.b.c` (c may be a submodule), so rules on submodules apply.
    """
    found: set[str] = set()
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target:
                found.add(target)
            found.update(f"{target}.{alias.name}" if target else alias.name for alias in node.names)
    return found


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def env_reads(source: str) -> list[int]:
    """Line numbers where `source` reads the process environment through the os module."""
    tree = ast.parse(source)
    os_names = {"os"}
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names.update(a.asname or a.name for a in node.names if a.name == "os")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and not node.level:
            lines.extend(node.lineno for a in node.names if a.name in ENV_NAMES)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ENV_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        ):
            lines.append(node.lineno)
    return sorted(lines)


def source_files(root: Path, packages: tuple[str, ...]) -> list[Path]:
    files = [p for pkg in packages for p in sorted((root / pkg).rglob("*.py")) if "__pycache__" not in p.parts]
    assert files, f"no sources found under {root}"
    return files


def layering_violations(root: Path) -> list[str]:
    """One line per forbidden import (or unparseable file) in the packages under `root`."""
    violations: list[str] = []
    for path in source_files(root, PACKAGES):
        module = module_name(path, root)
        package = module.split(".")[0]
        banned = FORBIDDEN.get(package, ())
        via = ACTORS_VIA.get(package)
        if not banned and via is None:
            continue
        rel = path.relative_to(root)
        try:
            names = imported_modules(path.read_text(), module, path.name == "__init__.py")
        except SyntaxError as exc:
            violations.append(f"{rel}:{exc.lineno}: cannot parse: {exc.msg}")
            continue
        bad = {name: prefix for name in names for prefix in banned if matches(name, prefix)}
        if via is not None:
            bad.update(
                {
                    name: "actors outside " + ", ".join(via)
                    for name in names
                    if matches(name, "actors") and name != "actors" and not any(matches(name, m) for m in via)
                }
            )
        # `from a import b` yields a and a.b: report the outermost forbidden name only
        violations.extend(
            f"{rel} imports {name} (forbidden: {prefix})"
            for name, prefix in sorted(bad.items())
            if not any(matches(name, other) and name != other for other in bad)
        )
    return violations


def env_violations(root: Path) -> list[str]:
    """One line per read of the environment outside api/settings.py (or unparseable file)."""
    violations: list[str] = []
    for path in source_files(root, ENV_PACKAGES):
        rel = path.relative_to(root)
        if rel.as_posix() == ENV_READER:
            continue
        try:
            lines = env_reads(path.read_text())
        except SyntaxError as exc:
            violations.append(f"{rel}:{exc.lineno}: cannot parse: {exc.msg}")
            continue
        violations.extend(f"{rel}:{line}" for line in lines)
    return violations


def test_dependency_direction() -> None:
    violations = layering_violations(ROOT)
    assert not violations, "layering violations (DESIGN §1):\n" + "\n".join(violations)


def test_only_settings_reads_the_environment() -> None:
    violations = env_violations(ROOT)
    assert not violations, "os.environ/os.getenv outside api/settings.py:\n" + "\n".join(violations)


# ---- the checker itself --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("import transport.server", "client.sdk", False, {"transport.server"}),
        ("from transport import server", "client.sdk", False, {"transport", "transport.server"}),
        ("from ..api import app", "actors.sub.x", False, {"actors.api", "actors.api.app"}),
        ("from .. import api", "actors.x", False, {"api"}),
        ("from . import ops", "actors", True, {"actors", "actors.ops"}),
        ("from .ops import apply_ops", "actors.session", False, {"actors.ops", "actors.ops.apply_ops"}),
        ("def f():\n    import api.cli\n", "storage.x", False, {"api.cli"}),
    ],
)
def test_imported_modules(source: str, module: str, is_package: bool, expected: set[str]) -> None:
    assert imported_modules(source, module, is_package) == expected


def test_env_reads_finds_every_spelling() -> None:
    source = (
        "import os\nimport os as o\nfrom os import getenv\n"
        "a = os.environ['X']\nb = o.getenv('Y')\nc = os.environ.get('Z')\nd = os.path.join('a')\n"
    )
    assert env_reads(source) == [3, 4, 5, 6]


def test_client_rule_allows_protocol() -> None:
    assert not any(matches("protocol.frames", p) for p in FORBIDDEN["client"])
    assert matches("transport.server", "transport.server")
    assert matches("transport.server.conn", "transport.server")


def test_checkers_find_violations_in_a_tree(tmp_path: Path) -> None:
    files = {
        "actors/__init__.py": "",
        "actors/session.py": "from transport.server import serve\nfrom storage.ports import Storage\n",
        "storage/__init__.py": "from ..actors import registry\n",
        "transport/server.py": "import os\nX = os.getenv('A')\n",
        "client/sdk.py": "from protocol.frames import Hello\nfrom transport import server\n",
        "api/settings.py": "import os\nE = os.environ\n",
        "api/app.py": "from actors import session\nfrom transport import server\n",
        "bench/run.py": "import os\nfrom api import app\nE = dict(os.environ)\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert sorted(layering_violations(tmp_path)) == [
        "actors/session.py imports transport.server (forbidden: transport)",
        "client/sdk.py imports transport (forbidden: transport)",
        "storage/__init__.py imports actors (forbidden: actors)",
    ]
    assert env_violations(tmp_path) == ["transport/server.py:2"]
