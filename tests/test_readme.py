"""The README's "How it fits together" names every module of the package, so it stays true as modules come and go."""

from __future__ import annotations

import re

from shortened.paths import REPO_ROOT


def _section(title: str) -> str:
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def named_modules(section: str) -> set[str]:
    """Module paths an item names: in full (`shortened/x/y.py`), or by base name after the item's first
    `shortened/x/` (folder or module path), as in "`shortened/data/` — `sources.py` → `stream.py`"."""
    named = set()
    for item in re.split(r"\n(?=\d+\. |Besides)", section):
        paths = re.findall(r"`(shortened/(?:[\w]+/)*)([\w]*\.py)?`", item)
        named |= {folder + name for folder, name in paths if name}
        if paths:
            folder = paths[0][0]
            named |= {folder + name for name in re.findall(r"`(\w+\.py)`", item)}
    return named


def test_how_it_fits_together_names_every_module():
    named = named_modules(_section("How it fits together"))
    modules = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "shortened").rglob("*.py")}
    missing = {m for m in modules - named if not m.endswith("__init__.py")}  # package markers need no line
    assert not missing, f"modules missing from README 'How it fits together': {sorted(missing)}"
    assert not named - modules, f"README 'How it fits together' names modules that do not exist: {sorted(named - modules)}"
