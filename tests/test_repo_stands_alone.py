"""The repository stands on its own: nothing a user or contributor reads points outside it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTSIDE = re.compile(r"\.\./shared|CONTRACT\.md|DESIGN\.md|PPO_CHECKLIST|checklist row", re.IGNORECASE)


def repo_texts() -> list[Path]:
    folders = ["ppo_cli", "conf", "recipes", "docs", "bench", "tests"]
    files = [REPO / "README.md", REPO / "Makefile"]
    for folder in folders:
        files += [p for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".md", ".yaml", ".txt"}]
    return [f for f in files if f.is_file() and f.name != Path(__file__).name]


def test_no_file_cites_documents_outside_the_repository():
    hits = [
        f"{f.relative_to(REPO)}:{n}: {line.strip()}"
        for f in repo_texts()
        for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_docs_links_in_the_readme_resolve():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if "://" not in target:
            assert (REPO / target).exists(), f"README links to {target}, which is not in the repository"
