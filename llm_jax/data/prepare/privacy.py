"""Personal data in documents: e-mail addresses, phone numbers, IPv4 and IPv6 addresses.

Each kind has a mode: "scrub" replaces every match with its placeholder (<EMAIL>, <PHONE>, <IP>), "drop" drops a
document with any match, "off" ignores the kind. `scrub_pii` returns the text with every match of a kind that is not
off replaced (also when the document is dropped, so a report can quote dropped documents without the data in them),
the count per kind, and the keep/drop decision with its reason.

Kinds are searched in the order of `KINDS` on the text as replaced so far, so the digits of an address are never
read again as a phone number.

Phone numbers are the loose part. A match is a run of digit groups joined by single separators (space, "-", ".",
parentheses) that either starts with "+" and has 8 to 15 digits (E.164), or has 7 to 11 digits in at least two
groups of two or more digits (a leading trunk "1" allowed) and is none of these look-alikes: a list of two-digit
numbers not starting with 0 (12 15 18 21 24; French numbers, 01 23 45 67 89, start with 0), a date (2024-03-15,
15.03.2024), a range of years (1999-2004), a dotted number with groups of three (12.345.678), a round number in
groups of three (100 000 000), an IPv4 address, or part of a longer token (a version such as v10.2.33.41, an
identifier). Single digit runs without "+" (order numbers, timestamps, card numbers) are never phone numbers.
Real phone numbers written in none of these shapes are missed, and a space-grouped count such as 612 345 678 is
taken for one (it is also how Spanish numbers are written).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re

KINDS = ("email", "ipv6", "ipv4", "phone")
MODES = ("scrub", "drop", "off")
PLACEHOLDERS = {"email": "<EMAIL>", "ipv6": "<IP>", "ipv4": "<IP>", "phone": "<PHONE>"}

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-]|\.\w)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)")
# A whole token of hex digits, colons and dots with a colon in it; `find_ipv6` checks the rest and ipaddress decides.
# One unbounded repeat after a colon-free prefix, so a long hex run costs linear time, never a backtracking blow-up.
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*")
_PHONE_CANDIDATE = re.compile(r"(?<![\w+.\-/])(?:\+\s?)?\(?\d[\d ().\-]{5,24}\d(?!\w|[.\-/:]\d)")
_DIGITS = re.compile(r"\d+")
_SEPARATOR = re.compile(r"[ .\-]|\) ?|[ \-]?\(|\) ?[\-.]")


def find_emails(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _EMAIL.finditer(text)]


def find_ipv4(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _IPV4.finditer(text)]


def _is_ipv6(candidate: str) -> bool:
    if not any(c.isdigit() for c in candidate):     # "::", "a::b", "dead::beef": C++ scopes, words
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def find_ipv6(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _IPV6_CANDIDATE.finditer(text):
        start, end = m.span()
        if end < len(text) and (text[end].isalnum() or text[end] == "_"):
            continue                                    # part of a longer word
        while end > start and text[end - 1] == ".":   # a full stop after the address
            end -= 1
        if text.count(":", start, end) >= 2 and _is_ipv6(text[start:end]):
            spans.append((start, end))
    return spans


def _looks_like_date(groups: list[str]) -> bool:
    if len(groups) != 3:
        return False
    lengths = tuple(len(g) for g in groups)
    if lengths == (4, 2, 2):
        year, month, day = groups
    elif lengths == (2, 2, 4):
        # 15.03.2024 or 03/15/2024: either order of day and month
        day, month, year = groups
        if int(month) > 12:
            day, month = month, day
    else:
        return False
    return 1 <= int(month) <= 12 and 1 <= int(day) <= 31 and 1000 <= int(year) <= 2999


def is_phone_number(candidate: str) -> bool:
    """Whether a candidate run of digits and separators is a phone number (rules in the module docstring)."""
    groups = _DIGITS.findall(candidate)
    separators = _DIGITS.split(candidate)
    lead, middle = separators[0], separators[1:-1]
    if lead.replace(" ", "") not in ("", "+", "(", "+("):
        return False
    if candidate.count("(") != candidate.count(")") or not all(_SEPARATOR.fullmatch(s) for s in middle):
        return False
    n_digits = sum(len(g) for g in groups)
    if lead.startswith("+"):
        return 8 <= n_digits <= 15
    if len(groups) < 2 or not 7 <= n_digits <= 11:
        return False
    if any(len(g) < 2 for g in groups[1:]) or (len(groups[0]) < 2 and groups[0] != "1"):
        return False
    if all(len(g) == 2 for g in groups) and not groups[0].startswith("0"):
        return False                                             # 12 15 18 21 24; French numbers start with 0
    if _looks_like_date(groups):
        return False
    if len(groups) == 2 and all(len(g) == 4 and 1000 <= int(g) <= 2999 for g in groups):
        return False                                             # 1999-2004
    grouped_by_three = len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])
    if grouped_by_three and (all(s == "." for s in middle) or groups[-1] == "000"):
        return False                                             # 12.345.678, 100 000 000
    if _IPV4.fullmatch(candidate):
        return False
    return True


def find_phones(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _PHONE_CANDIDATE.finditer(text):
        start, end = m.span()
        if text[start] == "(" and m.group(0).count("(") > m.group(0).count(")"):
            start += 1                                   # "(555-123-4567)": the bracket encloses the number
        if is_phone_number(text[start:end]):
            spans.append((start, end))
    return spans


FINDERS = {"email": find_emails, "ipv6": find_ipv6, "ipv4": find_ipv4, "phone": find_phones}


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """The mode of each kind: "scrub" (replace with its placeholder), "drop" (drop the document) or "off"."""
    email: str = "scrub"
    phone: str = "scrub"
    ipv4: str = "scrub"
    ipv6: str = "scrub"

    def __post_init__(self):
        for kind in KINDS:
            if getattr(self, kind) not in MODES:
                raise ValueError(f"PrivacyConfig.{kind} must be one of {MODES}, got {getattr(self, kind)!r}")


@dataclasses.dataclass(frozen=True)
class PrivacyResult:
    """The text with matches replaced, the number of matches per kind searched, and the decision."""
    text: str
    counts: dict[str, int]
    keep: bool
    reason: str = ""


def _replace_spans(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    pieces, last = [], 0
    for start, end in spans:
        pieces += [text[last:start], placeholder]
        last = end
    return "".join(pieces) + text[last:]


def scrub_pii(text: str, config: PrivacyConfig = PrivacyConfig()) -> PrivacyResult:
    counts: dict[str, int] = {}
    reasons = []
    for kind in KINDS:
        mode = getattr(config, kind)
        if mode == "off":
            continue
        spans = FINDERS[kind](text)
        counts[kind] = len(spans)
        if spans and mode == "drop":
            reasons.append(f"{kind}: {len(spans)} found")
        text = _replace_spans(text, spans, PLACEHOLDERS[kind])
    return PrivacyResult(text, counts, not reasons, "; ".join(reasons))
