"""The documentation stays true to the repository.

The README is the front door (short, the two set-up commands on its first screen); the config
reference is generated from config.py and must be regenerated when a key changes; every
relative link resolves; and the package's comments and docstrings point only at files the
repository has (no design notes, research files or issue numbers a reader cannot open).
"""

from __future__ import annotations

import ast
import fnmatch
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
PACKAGE = REPO / "daemon" / "pttd"

README_MAX_LINES = 250
FIRST_SCREEN = 25
SETUP_COMMANDS = [["./bootstrap.sh", "demo"], ["./bootstrap.sh", "test"]]

# Absolute paths under these are the running system's files, not pointers into the repository.
SYSTEM_ROOTS = ("/etc/", "/run/", "/usr/", "/var/", "/dev/", "/proc/", "/sys/", "/opt/",
                "/boot/", "/tmp/", "/lib/", "/home/", "/root/", "/srv/", "/mnt/")
# A name with one of these endings in a comment or docstring names a file of the repository.
FILE_POINTER = re.compile(
    r"(?<![\w./-])([\w./-]*[\w-]\.(?:md|py|sh|js|html|css|example|rules|json))(?![\w-])"
)
# Things a reader of the repository cannot open.
OUTSIDE_POINTERS = [
    (re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE), "an issue number"),
    (re.compile(r"§\s*\d"), "a section of a document not in the repository"),
    (re.compile(r"\bREADME\b"), "the README (an index now: name the docs/ page)"),
]


def test_config_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_config_ref.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_first_screen_holds_the_two_setup_commands():
    first = README.read_text().splitlines()[:FIRST_SCREEN]
    commands = [line.split("#")[0].split() for line in first if line.startswith("./")]
    assert commands == SETUP_COMMANDS


# --------------------------------------------------------------------------- links


def without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def link_targets(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text()))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in link_targets(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(REPO) or not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading in {file.name})")
    return broken


def test_docs_pages_exist():
    assert len(PAGES) > 10, [p.name for p in PAGES]


def test_every_relative_link_resolves():
    broken = {p.name: broken_links(p) for p in PAGES}
    assert {name: links for name, links in broken.items() if links} == {}


def test_readme_links_every_docs_page():
    linked = {Path(t.partition("#")[0]).name for t in link_targets(README)}
    assert {p.name for p in PAGES[1:]} - linked == set()


# --------------------------------------------------------------------------- the package's pointers


def comments_and_docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and every docstring, attribute docstrings included."""
    source = path.read_text()
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found.append((node.lineno, node.value.value))
    return found


def ignored_by(patterns: list[str]):
    """A matcher for the simple .gitignore forms this repository uses (names, globs, dir/ and
    /anchored paths), so the check needs no git: CI's Debian 13 chroot gets a copy without .git."""
    def ignored(rel: Path) -> bool:
        for pattern in patterns:
            anchored = pattern.strip("/")
            if "/" in anchored or pattern.startswith("/"):
                if rel.as_posix() == anchored or rel.as_posix().startswith(anchored + "/"):
                    return True
            elif any(fnmatch.fnmatch(part, anchored) for part in rel.parts):
                return True
        return False
    return ignored


def repository_files() -> tuple[set[Path], set[str]]:
    """The repository's files, new ones not yet committed included (but nothing git ignores)."""
    lines = (REPO / ".gitignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    ignored = ignored_by([".git/", *patterns])
    files = {f for f in REPO.rglob("*") if not ignored(f.relative_to(REPO))}
    files |= {parent for f in files for parent in f.parents if parent.is_relative_to(REPO)}
    return files, {f.name for f in files}


def resolves(name: str, source: Path, files: set[Path], names: set[str]) -> bool:
    if name.startswith(SYSTEM_ROOTS):
        return True
    if name.startswith("/"):
        return False
    candidates = [source.parent / name, REPO / name, REPO / "daemon" / name, PACKAGE / name]
    if any(c.resolve() in files for c in candidates):
        return True
    return "/" not in name and name in names  # a bare file name: that file, somewhere here


def pointers_outside(path: Path, files: set[Path], names: set[str]) -> list[str]:
    found = []
    where = path.relative_to(REPO)
    for first_line, text in comments_and_docstrings(path):
        def at(match: re.Match) -> str:
            return f"{where}:{first_line + text.count(chr(10), 0, match.start())}"

        for match in FILE_POINTER.finditer(text):
            if not resolves(match.group(1), path, files, names):
                found.append(f"{at(match)}: {match.group(1)} is not in the repository")
        for pattern, what in OUTSIDE_POINTERS:
            for match in pattern.finditer(text):
                found.append(f"{at(match)}: {match.group(0)!r} points at {what}")
    return found


def test_package_comments_point_only_at_files_in_the_repository():
    files, names = repository_files()
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += pointers_outside(path, files, names)
    assert found == [], "\n" + "\n".join(found)
