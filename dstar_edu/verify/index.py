"""A static index of the registered checks (id, title, seed source, covered functions) so ``dstar-edu list``
needs no torch.

Importing the check modules imports torch (about 2-3 s); listing ids should take a fraction of a second.
The index is a JSON file generated from the live registry and tracked in git; ``tests/test_verify_cli.py``
fails when it differs from the registry. Regenerate it with ``python -m dstar_edu.verify.index``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

INDEX_PATH = Path(__file__).with_name("checks_index.json")

__all__ = ["INDEX_PATH", "build_index", "read_index", "write_index"]


def build_index() -> list[dict]:
    """The index entries of the live registry (imports every check module)."""
    from .registry import select
    return [{"id": c.id, "title": c.title, "source": c.source, "dim": c.dim, "erratum": bool(c.printed),
             "covers": list(c.covers)} for c in select()]


def read_index() -> list[dict]:
    """The tracked index; the live registry when the checks are already imported in this process."""
    if "dstar_edu.verify.checks" in sys.modules:
        return build_index()
    try:
        return json.loads(INDEX_PATH.read_text())
    except (OSError, ValueError):                  # missing or damaged: fall back to the (slower) registry
        return build_index()


def write_index(path: Path = INDEX_PATH) -> int:
    entries = build_index()
    path.write_text(json.dumps(entries, indent=0) + "\n")
    return len(entries)


if __name__ == "__main__":
    print(f"wrote {write_index()} checks to {INDEX_PATH}")
