"""Both directions between seed citations, library functions and checks (``dstar-edu list --covers/--function``).

Works on index entries (``dstar_edu.verify.index``): plain dicts, no torch.

* ``by_citation(entries, "Eq. 14")``: the checks whose source or title cites Eq. 14 (also inside a range or list
  such as "Eq. 8-11" for Eq. 9, "Eq. 10, 14"; "handbook Eq. 14" only the handbook's), grouped by the library
  functions they exercise: equation -> functions -> checks.
* ``by_function(entries, "dstar_edu.samplers.diffusion.ddim")``: the checks that exercise that function (a
  unique suffix after a dot, e.g. ``diffusion.ddim``, names it too).

No match raises ``NoMatch`` naming the argument, the value and the closest existing citations or names.
"""
from __future__ import annotations

import difflib
import re

__all__ = ["NoMatch", "by_citation", "by_function", "cites", "citations"]

#: the kinds of citation the sources use, and the number forms ("14", "3.1", "B.13", "2.6.1")
_KINDS = {"eq": "Eq.", "eqs": "Eq.", "alg": "Alg.", "algorithm": "Alg.", "thm": "Thm", "theorem": "Thm",
          "prop": "Prop.", "proposition": "Prop.", "sec": "Sec.", "section": "Sec.", "table": "Table", "fig": "Fig.",
          "figure": "Fig.", "app": "App.", "lemma": "Lemma", "def": "Def.", "remark": "Remark"}
_NUM = r"[A-Z]?\d+(?:\.\d+)*[a-z]?"
_CITE = re.compile(r"\b(" + "|".join(sorted(_KINDS, key=len, reverse=True)) + r")\.?\s*(" + _NUM + r"(?:-" + _NUM
                   + r")?(?:,\s*" + _NUM + r"(?:-" + _NUM + r")?)*)", re.IGNORECASE)
_QUERY = re.compile(r"^(?P<paper>.*?)\s*\b(?P<kind>" + "|".join(_KINDS) + r")\.?\s*(?P<num>" + _NUM + r")$",
                    re.IGNORECASE)


class NoMatch(LookupError):
    """No check cites the citation / exercises the function asked for."""


def _items(numbers: str):
    """``"8-11, 14"`` -> ``["8", "9", "10", "11", "14"]`` (ranges of whole numbers expanded)."""
    for part in re.split(r",\s*", numbers):
        a, _, b = part.partition("-")
        if b and a.isdigit() and b.isdigit() and int(a) <= int(b):
            yield from (str(n) for n in range(int(a), int(b) + 1))
        else:
            yield from (x for x in (a, b) if x)


def _cited(text: str) -> set[tuple[str, str]]:
    """``{(kind, number)}`` cited in ``text``: "handbook Eq. 10, 14, Alg. 1" -> Eq. 10, Eq. 14, Alg. 1."""
    return {(_KINDS[m.group(1).lower()], n) for m in _CITE.finditer(text) for n in _items(m.group(2))}


def _segments(entry: dict) -> list[str]:
    """The check's source, one segment per cited document ("handbook Eq. 14; diffusers ..."); the title joins the
    first segment (its citations are of the check's main document)."""
    first, *rest = entry["source"].split(";")
    return [f"{first} | {entry['title']}", *rest]


def cites(entry: dict, query: str) -> bool:
    """Whether the check's source or title cites ``query``: "Eq. 14", "Thm 3.1", or with its document,
    "handbook Eq. 14", "SIM Thm 3.1" (the document's name must be in the same ';'-separated part of the source).
    Whole numbers only ("Eq. 1" is not "Eq. 14"); a range or list ("Eq. 8-11", "Eq. 10, 14") cites each member."""
    m = _QUERY.match(query.strip())
    if m is None:                                   # not "Kind number": a plain case-insensitive phrase
        return any(query.strip().lower() in seg.lower() for seg in _segments(entry))
    want = (_KINDS[m.group("kind").lower()], m.group("num"))
    paper = m.group("paper").strip().lower()
    return any(want in _cited(seg) and paper in seg.lower() for seg in _segments(entry))


def citations(entries: list[dict]) -> list[str]:
    """Every citation written in the checks' sources and titles, as "Kind number" (for suggestions)."""
    return sorted({f"{k} {n}" for e in entries for seg in _segments(e) for k, n in _cited(seg)})


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
