"""Both directions between seed citations, library functions and checks (``dstar-edu list --covers/--function``).

Works on index entries (``dstar_edu.verify.index``): plain dicts, no torch.

* ``by_citation(entries, "Eq. 14")``: the checks whose source or title cites Eq. 14 (also inside a range such
  as "Eq. 8-11" for Eq. 9), grouped by the library functions they exercise: equation -> functions -> checks.
* ``by_function(entries, "dstar_edu.samplers.diffusion.ddim")``: the checks that exercise that function (a
  unique suffix after a dot, e.g. ``diffusion.ddim``, names it too).

No match raises ``NoMatch`` naming the argument, the value and the closest existing citations or names.
"""
from __future__ import annotations

import difflib
import re

__all__ = ["NoMatch", "by_citation", "by_function", "cites", "citations"]

#: a citation as the sources write it: a capitalised word, an optional dot, a number ("Eq. 14", "Thm 3.1", "Alg. 3")
_CITATION = re.compile(r"[A-Z][\w*+]*\.? ?\d+(?:\.\d+)*(?:-\d+(?:\.\d+)*)?")


class NoMatch(LookupError):
    """No check cites the citation / exercises the function asked for."""


def _pattern(query: str) -> re.Pattern:
    words = [re.escape(w) for w in query.split()]
    # the citation must end where a number ends: "Eq. 1" is not "Eq. 14" and "Thm 3" is not "Thm 3.1"
    return re.compile(r"(?<![\w.])" + r"\s*".join(words) + r"(?![\w]|\.\d)", re.IGNORECASE)


def _in_range(query: str, text: str) -> bool:
    """``query = "Eq. 9"`` and ``text`` cites the range "Eq. 8-11"."""
    m = re.fullmatch(r"(.*?)\s*(\d+)", query.strip())
    if not m or not m.group(1):
        return False
    prefix, n = m.group(1), int(m.group(2))
    pat = re.compile(r"(?<![\w.])" + r"\s*".join(re.escape(w) for w in prefix.split()) + r"\s*(\d+)-(\d+)(?![\w]|\.\d)",
                     re.IGNORECASE)
    return any(int(a) <= n <= int(b) for a, b in pat.findall(text))


def cites(entry: dict, query: str) -> bool:
    """Whether the check's source or title cites ``query`` (case-insensitive, whole numbers, ranges included)."""
    text = f"{entry['source']} | {entry['title']}"
    return bool(_pattern(query).search(text)) or _in_range(query, text)


def citations(entries: list[dict]) -> list[str]:
    """Every citation written in the checks' sources and titles (for suggestions)."""
    return sorted({c for e in entries for c in _CITATION.findall(f"{e['source']} | {e['title']}")})


def _closest(query: str, names: list[str], n: int = 6) -> str:
    close = difflib.get_close_matches(query, names, n=n, cutoff=0.5)
    return ", ".join(repr(c) for c in close) if close else "none close"


def by_citation(entries: list[dict], query: str) -> dict[str, list[dict]]:
    """``{function: [entries]}`` for the checks citing ``query``; most-checked function first."""
    if not isinstance(query, str) or not query.strip():
        raise NoMatch(f"--covers needs a citation such as 'Eq. 14' or 'SIM Thm 3.1', got {query!r}")
    hits = [e for e in entries if cites(e, query)]
    if not hits:
        raise NoMatch(f"no check cites --covers {query!r} (in its source or title); closest citations: "
                      f"{_closest(query, citations(entries))}")
    groups: dict[str, list[dict]] = {}
    for e in hits:
        for name in e["covers"]:
            groups.setdefault(name, []).append(e)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


def by_function(entries: list[dict], name: str) -> dict[str, list[dict]]:
    """``{function: [entries]}`` for the functions named ``name`` (dotted name, or a suffix after a dot)."""
    if not isinstance(name, str) or not name.strip():
        raise NoMatch(f"--function needs a dotted name such as 'dstar_edu.samplers.diffusion.ddim', got {name!r}")
    name = name.strip()
    known = sorted({f for e in entries for f in e["covers"]})
    matched = [f for f in known if f == name] or [f for f in known if f.endswith("." + name)]
    if not matched:
        suffixes: dict[str, list[str]] = {}          # every dotted suffix of every name, e.g. "ddim_step"
        for f in known:
            parts = f.split(".")
            for i in range(1, len(parts)):
                suffixes.setdefault(".".join(parts[i:]), []).append(f)
        close = difflib.get_close_matches(name, list(suffixes), n=6, cutoff=0.6)
        close = list(dict.fromkeys(f for c in close for f in suffixes[c]))[:6]
        raise NoMatch(f"no check exercises --function {name!r}; closest covered functions: "
                      f"{', '.join(close) if close else 'none close'} ('dstar-edu list --covers CITATION' lists them "
                      "by equation)")
    return {f: [e for e in entries if f in e["covers"]] for f in matched}
