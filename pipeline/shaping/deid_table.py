"""PS3.15 Table E.1-1 resolved for one endpoint's options: the action for each tag.

The table (:mod:`pipeline.shaping.table_e1_1`, generated from the standard) gives each
attribute a Basic Profile action and, per option, an action that replaces it. Resolving
one endpoint's options gives one action per attribute, and combined codes become one
action, always the one that keeps the attribute present where the table allows it (an
IOD that requires the attribute stays valid, and an empty or dummy value carries no
identity either):

* options: of the actions the enabled options give, ``K`` wins over ``C`` (the operator
  asked to retain), ``C`` over anything else, and an option's action over the Basic
  Profile's;
* ``X/Z`` → ``Z``; ``X/D``, ``Z/D``, ``X/Z/D`` → ``D``; ``X/Z/U*`` → ``U`` (the
  sequence is kept, its UIDs replaced).
* but ``X/Z`` on a sequence → ``X``: a sequence with no item is valid only where the
  sequence is Type 2 (an empty value is valid for any other attribute), so ``Z`` is
  kept only for :data:`TYPE_2_SEQUENCES`.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.datadict import dictionary_VR

from pipeline.shaping.table_e1_1 import ROWS

#: a combined code of the table, resolved (see the module docstring)
COMBINED = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U", "U*": "U"}
SINGLE = frozenset("DZXKCU")
#: the ``X/Z`` sequences that are Type 2 where they appear (PS3.3: Acquisition Context
#: Sequence, Acquisition Context Module): emptied, not removed
TYPE_2_SEQUENCES = frozenset({0x00400555})


def resolve(basic: str, by_option: dict[str, str], options: Iterable[str]) -> str:
    """The one action of a row for the enabled ``options``."""
    chosen = [by_option[option] for option in options if option in by_option]
    if "K" in chosen:
        code = "K"
    elif "C" in chosen:
        code = "C"
    elif chosen:
        code = chosen[0]
    else:
        code = basic
    code = COMBINED.get(code, code)
    if code not in SINGLE:
        raise ValueError(f"unknown action code {code!r} in Table E.1-1")
    return code


class ActionTable:
    """Tag → action for one set of options (exact tags, then the table's wildcards)."""

    def __init__(self, options: frozenset[str]) -> None:
        self.exact: dict[int, str] = {}
        self.patterns: list[tuple[int, int, str]] = []  # (mask, value, action)
        for pattern, _name, basic, by_option in ROWS:
            action = resolve(basic, by_option, sorted(options))
            if "x" in pattern:
                mask = int("".join("0" if c == "x" else "F" for c in pattern), 16)
                value = int(pattern.replace("x", "0"), 16)
                self.patterns.append((mask, value, action))
            else:
                tag = int(pattern, 16)
                if action == "Z" and basic == "X/Z" and _is_sequence(tag) \
                        and tag not in TYPE_2_SEQUENCES:
                    action = "X"
                self.exact[tag] = action

    def action(self, tag: int) -> str | None:
        """The resolved action; None when the table does not list the attribute."""
        found = self.exact.get(tag)
        if found is not None:
            return found
        for mask, value, action in self.patterns:
            if tag & mask == value:
                return action
        return None


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False
