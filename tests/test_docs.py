"""The written guarantees stay where users look for them, and name every answer."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEMANTICS = ROOT / "docs" / "SEMANTICS.md"
# Every errno enosfs answers for a reason of its own (fs.py, errors.py).
ERRNOS = ("ENOENT", "EACCES", "ETIMEDOUT", "ESTALE", "EIO", "EROFS")


def test_the_readme_links_to_the_semantics() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/SEMANTICS.md" in readme
    for anchor in re.findall(r"\]\(docs/SEMANTICS\.md#([a-z0-9-]+)\)", readme):
        headings = re.findall(r"^#+ (.+)$", SEMANTICS.read_text(encoding="utf-8"), re.M)
        slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, f"README links to a missing section: #{anchor}"


def test_the_semantics_name_every_errno() -> None:
    text = SEMANTICS.read_text(encoding="utf-8")
    missing = [name for name in ERRNOS if not re.search(rf"`{name}`", text)]
    assert not missing, f"docs/SEMANTICS.md does not say when enosfs answers {missing}"
