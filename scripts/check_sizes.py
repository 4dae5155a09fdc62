#!/usr/bin/env python3
"""Size limits a newcomer can read (issue 25): modules <= 500 lines, classes <= 300, functions
<= 50 (physical lines, docstrings included). Prints every one over, exits 1 if any.

    scripts/check_sizes.py [PATH...]     (default: daemon/pttd)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MODULE_MAX, CLASS_MAX, FUNCTION_MAX = 500, 300, 50


def over_limits(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    lines = text.count("\n") + 1
    if lines > MODULE_MAX:
        found.append(f"{path}: module of {lines} lines (max {MODULE_MAX})")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.ClassDef):
            limit, kind = CLASS_MAX, "class"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit, kind = FUNCTION_MAX, "function"
        else:
            continue
        size = (node.end_lineno or node.lineno) - node.lineno + 1
        if size > limit:
            found.append(f"{path}:{node.lineno}: {kind} {node.name} of {size} lines (max {limit})")
    return found


def main(argv: list[str]) -> int:
    roots = [Path(a) for a in argv] or [Path(__file__).resolve().parent.parent / "daemon/pttd"]
    found = []
    for root in roots:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            found += over_limits(path)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
