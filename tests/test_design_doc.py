"""docs/design.md's module table names every module of the package, and nothing that is not there.

A row's first cell lists one or more paths relative to ``dpsign_fl/`` in
backticks: a module (``vote.py``), a package as a whole (``privacy/``), or a
module of a package listed module by module (``flower/client.py``). The
packages listed as a whole are not looked into; ``flower/`` is listed module by
module, so every module in it needs a row.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dpsign_fl"
DESIGN = ROOT / "docs" / "design.md"


def table_paths() -> set[str]:
    paths = set()
    for line in DESIGN.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split("|")[1]
        paths.update(re.findall(r"`([^`]+)`", first_cell))
    return paths


def tree_paths(listed_whole: set[str]) -> set[str]:
    """Every module and package of dpsign_fl/ as the table should name it."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.name == "__init__.py" and len(relative.parts) == 1:
            continue  # the package's own front door
        top = relative.parts[0]
        if len(relative.parts) == 1:
            found.add(top)
        elif f"{top}/" in listed_whole:
            found.add(f"{top}/")
        elif relative.name != "__init__.py":
            found.add(relative.as_posix())
    return found


def test_every_module_has_a_row_in_the_design_docs_module_table():
    listed = table_paths()

    missing = tree_paths(listed) - listed

    assert not missing, f"docs/design.md's module table lacks {sorted(missing)}"


def test_every_path_in_the_module_table_exists():
    listed = table_paths()

    absent = sorted(path for path in listed if not (PACKAGE / path.rstrip("/")).exists())

    assert not absent, f"docs/design.md's module table names {absent}, which dpsign_fl/ does not hold"
