"""The checks every named ``[[table]]`` of the experiments/rules TOML shares."""

from __future__ import annotations

import re
from collections.abc import Iterator


def named_tables(
    doc: list, source: str, section: str, kind: str, known: set[str], max_name: int
) -> Iterator[tuple[dict, str, str]]:
    """Yield ``(table, name, where)`` for each table of ``[[section]]``.

    Each must be a table with only ``known`` keys and a unique lower_snake_case ``name``
    of at most ``max_name`` characters; ``where`` names it in later error messages.

    Raises
    ------
    ValueError
        Naming the table by position, the key and what is wrong.
    """
    pattern = re.compile(rf"^[a-z][a-z0-9_]{{0,{max_name - 1}}}$")
    names: set[str] = set()
    for i, table in enumerate(doc):
        where = f"{source}: {section}[{i}]"
        if not isinstance(table, dict):
            raise ValueError(f"{where} must be a table")
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        name = table.get("name")
        if not isinstance(name, str) or not pattern.match(name):
            raise ValueError(f"{where}: name must be lower_snake_case, at most {max_name} characters, got {name!r}")
        if name in names:
            raise ValueError(f"{where}: duplicate {kind} name {name!r}")
        names.add(name)
        yield table, name, f"{source}: {kind} {name!r}"
