#!/usr/bin/env python3
"""Assemble README.md from docs/sections/*.md (the sections are the source; edit those)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDER = [
    "00-head.md",
    "10-how.md",
    "install.md",
    "audio.md",
    "control-and-leds.md",
    "20-contract.md",
    "fleet-tokens.md",
    "systemd.md",
    "local-engine.md",
    "kiosk.md",
    "typing-and-mqtt.md",
    "90-deps.md",
]


def main() -> None:
    sections = ROOT / "docs" / "sections"
    parts = [(sections / name).read_text().strip() for name in ORDER if (sections / name).exists()]
    extra = sorted(set(p.name for p in sections.glob("*.md")) - set(ORDER))
    if extra:
        raise SystemExit(f"sections not placed in ORDER: {extra}")
    toc = ["## Contents", ""]
    for part in parts[1:]:
        for line in part.splitlines():
            if line.startswith("## "):
                title = line[3:].strip()
                anchor = "".join(
                    c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_"
                )
                toc.append(f"- [{title}](#{anchor})")
    text = parts[0] + "\n\n" + "\n".join(toc) + "\n\n" + "\n\n".join(parts[1:]) + "\n"
    (ROOT / "README.md").write_text(text)


if __name__ == "__main__":
    main()
