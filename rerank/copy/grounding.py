"""Grounding: the check every line of copy passes, in Python and in the served graph.

The grounding check: a copy line passes when it names the item's title and names no catalog
title outside the prompt. Titles are found case-sensitively, with word boundaries where a title
begins or ends with a letter or digit, longest titles first, so `Fear` is not found inside
`Primal Fear` (`TitleMatcher`). The same patterns run in Python (`re`) and in the exported graph
(RE2), with the same semantics. Every corpus line passes the check, checked as it is drawn (a
line that reads a catalog title into a frame or pool phrase is drawn again). Copy and fallback
lines use only the categories whose lower-cased word holds no catalog title (`spoken`; MovieLens's
genre `unknown` is item 267's title), so the fallback line is grounded by construction.

`TitleMatcher` is the Python side (corpus building, evaluation), `TitleCheck` the same passes as
TF ops inside the exported copywriter; `fallback_line` is the deterministic line served when a
generated one fails.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf

from towers import data

_ARTICLES = ("The", "A", "An", "Il", "La", "Le", "Les", "Das", "Der", "Die", "El", "Lo")


def display_title(title: str) -> str:
    """The catalog title as people write it: `Usual Suspects, The` -> `The Usual Suspects`."""
    match = re.fullmatch(rf"(.+), ({'|'.join(_ARTICLES)})( \(.*\))?", title)
    if not match:
        return title
    return f"{match.group(2)} {match.group(1)}{match.group(3) or ''}"


def spoken(item: data.ItemFacts, matcher: TitleMatcher) -> data.ItemFacts:
    """`item` with only the categories whose lower-cased word holds no catalog title, the ones
    copy may say: MovieLens's genre `unknown` is also a title (item 267), so it is left out."""
    return dataclasses.replace(item, categories=tuple(
        category for category in item.categories if matcher.speakable(category.lower())))


def fallback_line(item: data.ItemFacts, liked: list[data.ItemFacts], matcher: TitleMatcher) -> str:
    """The deterministic line served when a generation fails the check; grounded by construction."""
    return item_fallback(item, matcher) + (user_fallback(liked[0]) if liked else "")


def item_fallback(item: data.ItemFacts, matcher: TitleMatcher) -> str:
    """The item's part of the fallback line: `Toy Story (1995): animation, children's, comedy.`;
    without a year or categories, `Night Ferry.`"""
    year = "" if item.year == data.UNKNOWN_YEAR else f" ({item.year})"
    categories = ", ".join(spoken(item, matcher).categories).lower()
    return f"{display_title(item.title)}{year}" + (f": {categories}." if categories else ".")


def user_fallback(liked: data.ItemFacts) -> str:
    """The user's part of the fallback line, after the item's."""
    return f" Picked for fans of {display_title(liked.title)}."


class TitleMatcher:
    """Finds catalog titles (display form) in text, longest titles first.

    The titles, longest first, are cut into `CHUNKS` alternations (one alternation of all 1,664
    exceeds RE2's DFA memory, and RE2 then falls back to a 7x slower NFA with an error log per
    call). Each pass wraps the matches of one chunk in markers, `\\x01title\\x02`, and skips text
    already wrapped, so a title inside a longer one found earlier is not found again. `passes`
    are the RE2-compatible patterns the exported graph runs with the same semantics.
    """

    CHUNKS = 4
    PREFIX = 16  # characters a title is indexed by: a text is checked only against the titles
    #             whose first PREFIX characters (all of a shorter title) occur in it

    def __init__(self, items: dict[str, data.ItemFacts]):
        self.item_ids = list(items)
        self.titles = sorted({display_title(item.title) for item in items.values()})
        self.title_index = {title: index for index, title in enumerate(self.titles)}
        self.item_title = {item_id: self.title_index[display_title(item.title)]
                           for item_id, item in items.items()}
        ordered = sorted(self.titles, key=lambda t: (-len(t), t))
        size = -(-len(ordered) // self.CHUNKS)
        self.chunks = [ordered[start:start + size] for start in range(0, len(ordered), size)]
        self.passes = [pass_pattern(chunk) for chunk in self.chunks]
        self._chunk = {title: c for c, chunk in enumerate(self.chunks) for title in chunk}
        self._order = {title: r for r, title in enumerate(ordered)}
        self._by_prefix: dict[str, list[str]] = {}
        for title in self.titles:
            self._by_prefix.setdefault(title[:self.PREFIX], []).append(title)
        self._lengths = sorted({len(prefix) for prefix in self._by_prefix})
        self._speakable: dict[str, bool] = {}

    def _present(self, text: str) -> list[list[str]]:
        """Per chunk, its titles that occur in `text` as substrings, in the chunk's order: found
        through the prefix index, so the cost grows with the text, not with the catalog."""
        present = [[] for _ in self.chunks]
        starts = {text[p:p + n] for n in self._lengths for p in range(len(text) - n + 1)}
        for prefix in starts:
            for title in self._by_prefix.get(prefix, ()):
                if title in text:
                    present[self._chunk[title]].append(title)
        for titles in present:
            titles.sort(key=self._order.__getitem__)
        return present

    def titles_in(self, text: str) -> list[str]:
        """The titles found, in text order, none overlapping."""
        for present in self._present(text):
            # Only titles that occur as substrings can match, so an alternation of those finds
            # what the chunk's pattern finds, and Python's backtracking `re` is fast on it.
            if present:
                text = _compiled(pass_pattern(tuple(present))).sub(
                    lambda m: m.group(1) or f"\x01{m.group(2)}\x02", text)
        return re.findall("\x01([^\x02]*)\x02", text)

    def speakable(self, text: str) -> bool:
        """`text` holds no catalog title (cached: every item asks about the same categories)."""
        if text not in self._speakable:
            self._speakable[text] = not self.titles_in(text)
        return self._speakable[text]

    def check(self, text: str, item_id: str, liked) -> tuple[bool, list[str]]:
        """(the item's title is present, the titles found that are not in the prompt)."""
        found = {self.title_index[title] for title in self.titles_in(text)}
        allowed = {self.item_title[item_id], *(self.item_title[i] for i in liked)}
        return self.item_title[item_id] in found, sorted(self.titles[t] for t in found - allowed)


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.ASCII)


def escape(text: str) -> str:
    """`text` as a literal in a pattern that RE2 and Python's `re` read alike."""
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


def pass_pattern(titles) -> str:
    """Group 1: text already wrapped in markers; group 2: one of `titles`, longest first, with
    `\b` where a title starts or ends with an ASCII letter or digit (RE2 and `re.ASCII` agree
    on what that is)."""
    parts = []
    for title in sorted(titles, key=lambda t: (-len(t), t)):
        escaped = escape(title)
        start = r"\b" if re.match(r"\w", title[0], re.ASCII) else ""
        end = r"\b" if re.match(r"\w", title[-1], re.ASCII) else ""
        parts.append(f"{start}{escaped}{end}")
    return "(\x01[^\x02]*\x02)|(" + "|".join(parts) + ")"


class TitleCheck(tf.Module):
    """The grounding check in the graph: the catalog title ids found in each line, with the
    passes of `TitleMatcher` (RE2 here, the same semantics). Each pass wraps one
    chunk's matches in marker characters by a global replace (text already wrapped is copied
    through, with an empty marker pair that is then dropped); the titles are then cut out with
    string splits, so nothing loops over rows."""

    def __init__(self, matcher: TitleMatcher):
        super().__init__()
        self.passes = matcher.passes
        self.titles = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(matcher.titles), tf.range(len(matcher.titles), dtype=tf.int32)), -1)

    def __call__(self, text):
        """text string [R] -> title ids int32 [R, (found)]."""
        for pattern in self.passes:
            text = tf.strings.regex_replace(text, pattern, "\\1\x01\\2\x02")
            text = tf.strings.regex_replace(text, "\x01\x02", "")
        pieces = tf.strings.split(text, "\x01")[:, 1:]  # each starts with a title, then \x02
        found = tf.ragged.map_flat_values(tf.strings.regex_replace, pieces, "\x02(?s:.*)", "")
        return tf.ragged.map_flat_values(self.titles.lookup, found)
