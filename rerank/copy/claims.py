"""Every claim a line of copy makes, checked: the frame it follows, its category phrase, its
year and its era, against the item's facts.

The copy corpus writes each line from a sentence frame whose slots are filled from pools
(`templates`): the title and cited titles are slot tokens (checked by `grounding` and by the
decoder's slot check), and the facts a line states are the category phrase (`{g}`, `{ag}`,
`{aeg}`, `{ag_cap}`), the year (`{y}`, `{py}`) and the era (`{era}`). The model can splice frames
("... an action film made for to try tonight") or copy a fact from the wrong place ("Aliens brings
an early-'70s suspenseful gem" for a 1986 film). So a served line must:

- follow one of the frames exactly (pools included), read with titles as slot tokens: each frame
  is one anchored RE2 pattern whose groups capture the fact slots (`FramePattern`); a line that no
  frame matches is malformed;
- state only true facts: every captured category phrase is one the item's spoken categories
  allow (`allowed_phrases`: an adjective and a noun of its categories, a noun, or an adjective
  with a generic noun; `NO_CATEGORY_WORDS` when it has none), every captured year is the item's,
  every captured era is `templates.era` of the item's year.

`ClaimCheck` runs the same patterns as TF ops in the exported copywriter (`graph`), and a line that
fails is replaced by the deterministic factual line. `find_claims` is the independent checker of
the evaluation: it does not parse frames but scans the lexicalized line for every year, era and
category word of the whole vocabulary, and reports each one that does not hold, by claim type.
"""

from __future__ import annotations

import dataclasses
import os
import re
import string

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank.copy import grounding, templates
from towers import data

# The slot tokens as the checked text holds them (`Detokenizer` with these as slot text).
SLOT_TEXT = tuple(" " + slot for slot in templates.SLOTS)
ERA = r"(?:early|mid|late)(?:-'\d\ds| \d{4}s)"
# A category phrase, at most four words (the corpus's longest, adjective + noun, have four): what it
# may be is checked against the item's facts; the bound keeps a spliced clause from passing as one.
PHRASE = r"[^ ,.;:!?]+(?: [^ ,.;:!?]+){0,3}?"
MATCHED = "\x01"  # a checked line that a frame matched becomes MATCHED + "kind:value;..."


@dataclasses.dataclass(frozen=True)
class FramePattern:
    """One frame as an anchored RE2 pattern and the rewrite that turns a match into its claims."""

    frame: str
    pattern: str
    rewrite: str  # MATCHED + "g:\\1;y:\\2;..." (RE2 rewrites reach \\9 at most)


def _alternation(options) -> str:
    return "(?:" + "|".join(grounding.escape(option) for option in sorted(options, key=lambda o: (-len(o), o))) + ")"


def _years() -> tuple[str, int]:
    """(the year slot `{y}`'s pattern, its number of groups): empty, or exactly one of
    `templates.YEARS`, the year captured. RE2 has no branch reset, so the forms that end with the
    year share one group and each form with words after it (" of 1995 vintage") has its own:
    a form's ending never follows another's beginning (" that hit screens in 1981 vintage")."""
    plain = {phrase.split("{0}")[0] for phrase in templates.YEARS if phrase.endswith("{0}")}
    suffixed = sorted(phrase for phrase in templates.YEARS if not phrase.endswith("{0}"))
    forms = [f"{_alternation(plain)}(\\d{{4}})"] + [
        grounding.escape(phrase.split("{0}")[0]) + "(\\d{4})" + grounding.escape(phrase.split("{0}")[1])
        for phrase in suffixed]
    return "(?:" + "|".join(forms) + ")?", len(forms)


def _expand(frame: str, kinds: list[str]) -> str:
    """The regex of `frame`; each fact group's kind appended to `kinds` in group order."""
    liked = "(?:" + "|".join(grounding.escape(slot) for slot in templates.LIKED_SLOTS) + ")"
    out = []
    for literal, field, _, _ in string.Formatter().parse(frame):
        out.append(grounding.escape(literal))
        if field is None:
            continue
        if field == "T":
            out.append(grounding.escape(templates.TITLE_SLOT))
        elif field in ("L", "L2", "L3"):
            out.append(liked)
        elif field == "py":
            out.append(r"(?: \((\d{4})\))?")
            kinds.append("y")
        elif field == "y":
            pattern, groups = _years()
            out.append(pattern)
            kinds.extend(["y"] * groups)  # at most one of them matches
        elif field == "era":
            out.append(f"(?:({ERA}) )?")
            kinds.append("e")
        elif field in ("g", "ag", "ag_cap"):
            article = {"g": "", "ag": "(?:a|an) ", "ag_cap": "(?:A|An) "}[field]
            out.append(f"{article}({PHRASE})")
            kinds.append("g")
        elif field == "aeg":
            out.append(f"(?:a|an) (?:({ERA}) )?({PHRASE})")
            kinds.extend(["e", "g"])
        elif field in templates.POOLS:
            entries = templates.POOLS[field]
            if any("{L}" in entry for entry in entries):
                out.append("(?:" + "|".join(_expand(entry, kinds) for entry in entries) + ")")
            else:
                out.append(_alternation(entries))
        else:
            raise ValueError(f"frame {frame!r}: unknown slot {{{field}}}")
    return "".join(out)


def frame_patterns() -> list[FramePattern]:
    """Every frame of the corpus as an anchored pattern over the checked text (titles as slot
    tokens, leading space removed)."""
    out = []
    for frame in (*templates.FRAMES_NONE, *templates.FRAMES_ONE, *templates.FRAMES_TWO):
        kinds: list[str] = []
        body = _expand(frame, kinds)
        groups = re.compile(body).groups
        if groups != len(kinds):
            raise AssertionError(f"{frame!r}: {groups} groups, {len(kinds)} kinds")
        if groups > 9:
            raise ValueError(f"{frame!r}: {groups} fact groups; an RE2 rewrite reaches \\9")
        rewrite = MATCHED + ";".join(f"{kind}:\\{n + 1}" for n, kind in enumerate(kinds))
        out.append(FramePattern(frame, f"^{body}$", rewrite))
    return out


def checked_text(template: str) -> str:
    """What the check reads for a model output `template` (slot tokens for titles, as written):
    each slot token with the space it stands for, as `Detokenizer` writes it with `SLOT_TEXT`."""
    for slot in templates.SLOTS:
        template = template.replace(slot, " " + slot)
    return re.sub(" +", " ", template).strip()


def category_words(item: data.ItemFacts) -> tuple[set[str], set[str]]:
    """(adjectives, nouns) the copy may use for `item` (its spoken categories)."""
    words = ([templates.category_words(category) for category in item.categories]
             or [templates.NO_CATEGORY_WORDS])
    return {a for w in words for a in w[0]}, {n for w in words for n in w[1]}


def allowed_phrases(item: data.ItemFacts) -> frozenset[str]:
    """Every category phrase true of `item` (its spoken categories, `grounding.spoken`): a noun of
    its categories, or an adjective of its categories before such a noun or a generic noun."""
    adjectives, nouns = category_words(item)
    return frozenset(nouns | {f"{a} {n}" for a in adjectives for n in (*nouns, *templates.NOUNS)})


def check_template(text: str, item: data.ItemFacts,
                   patterns: list[FramePattern] | None = None) -> tuple[bool, list[tuple[str, str]]]:
    """(a frame matches, the claims that do not hold as (kind, value)) for a checked line: the
    copy with titles as slot tokens (`SLOT_TEXT`), as `ClaimCheck` reads it, in Python."""
    phrases = allowed_phrases(item)
    year = "" if item.year == data.UNKNOWN_YEAR else item.year
    truth = {"y": year, "e": templates.era(year) if year else ""}
    for frame in patterns or _PATTERNS:
        match = re.fullmatch(frame.pattern[1:-1], text.strip())
        if match:
            kinds = [part[0] for part in frame.rewrite[1:].split(";") if part]
            wrong = [(kind, value) for kind, value in zip(kinds, match.groups(default=""))
                     if value and (value not in phrases if kind == "g" else value != truth[kind])]
            return True, wrong
    return False, []


def find_claims(line: str, item: data.ItemFacts, cited: list[data.ItemFacts],
                vocabulary: set[str]) -> dict[str, list[str]]:
    """The independent checker: every fact the served line states that does not hold, by type,
    found by scanning the line (no frame parsing). `item` holds the item's spoken facts; `cited`
    the facts of the titles the line may cite; `vocabulary` every category word of the catalog
    (`claim_vocabulary`). Types: `year` (a four-digit year other than the item's), `era` (an era
    other than the item's), `category` (a category word none of the item's categories has)."""
    text = line
    for title in sorted({grounding.display_title(i.title) for i in (item, *cited)}, key=len,
                        reverse=True):
        text = text.replace(title, "\x00")  # titles may hold years or category words
    wrong: dict[str, list[str]] = {"year": [], "era": [], "category": []}
    year = "" if item.year == data.UNKNOWN_YEAR else item.year
    for era in re.findall(ERA, text):
        if not year or era != templates.era(year):
            wrong["era"].append(era)
    text = re.sub(ERA, " ", text)
    for found in re.findall(r"(?<!\d)\d{4}(?!\d)", text):
        if found != year:
            wrong["year"].append(found)
    adjectives, nouns = category_words(item)
    allowed = {*adjectives, *nouns, *templates.NOUNS}
    for word in sorted(vocabulary, key=len, reverse=True):
        pattern = rf"(?<![\w'-]){re.escape(word)}(?![\w'-])"
        for _ in re.findall(pattern, text):
            if word not in allowed:
                wrong["category"].append(word)
        text = re.sub(pattern, " ", text)
    return wrong


def claim_vocabulary(items) -> set[str]:
    """Every category adjective and noun any item of the catalog could be described with."""
    words = {w for adjectives, nouns in templates.GENRE_WORDS.values() for w in (*adjectives, *nouns)}
    for item in items:
        for category in item.categories:
            adjectives, nouns = templates.category_words(category)
            words |= {*adjectives, *nouns}
    return words | set(templates.NO_CATEGORY_WORDS[0]) | set(templates.NO_CATEGORY_WORDS[1])


class ClaimCheck(tf.Module):
    """The frame and fact check in the graph: each frame's pattern rewrites a line it matches
    into its claims (`MATCHED` + "kind:value;..."), and each claim is looked up against the row's
    item: the year and era as strings, the category phrase in a table of (category set, phrase)
    pairs, so an item is one integer (its category set) and the table grows with the catalog's
    distinct category sets, not with users or items."""

    def __init__(self, items: list[data.ItemFacts]):
        """`items`: the spoken facts of each item row, in the order of the rows it is called with."""
        super().__init__()
        self.patterns = _PATTERNS
        signature: dict[tuple[str, ...], int] = {}
        item_set = []
        for item in items:
            item_set.append(signature.setdefault(tuple(sorted(item.categories)), len(signature)))
        keys = []
        for categories, index in signature.items():
            probe = data.ItemFacts("", "", data.UNKNOWN_YEAR, categories)
            keys += [f"{index}\x1f{phrase}" for phrase in sorted(allowed_phrases(probe))]
        self.phrases = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(keys), tf.ones(len(keys), tf.int32)), 0)
        self.item_set = tf.constant(np.asarray(item_set, np.int32))
        years = ["" if item.year == data.UNKNOWN_YEAR else item.year for item in items]
        self.item_year = tf.constant(years)
        self.item_era = tf.constant([templates.era(year) if year else "" for year in years])

    def __call__(self, text, row):
        """text string [R] (titles as slot tokens), item row int32 [R] -> (a frame matched [R],
        every claim holds [R])."""
        for frame in self.patterns:
            text = tf.strings.regex_replace(text, frame.pattern, frame.rewrite, replace_global=False)
        matched = tf.strings.substr(text, 0, 1) == MATCHED
        claims = tf.strings.split(tf.strings.regex_replace(text, "^" + MATCHED, ""), ";")
        kind = tf.ragged.map_flat_values(tf.strings.substr, claims, 0, 1)
        value = tf.ragged.map_flat_values(tf.strings.regex_replace, claims, "^[^:]*:", "")
        which = claims.value_rowids()
        flat_kind, flat_value = kind.flat_values, value.flat_values
        item_row = tf.gather(row, which)
        phrase_key = tf.strings.join([tf.strings.as_string(tf.gather(self.item_set, item_row)),
                                      flat_value], separator="\x1f")
        holds = ((flat_value == "")
                 | ((flat_kind == "y") & (flat_value == tf.gather(self.item_year, item_row)))
                 | ((flat_kind == "e") & (flat_value == tf.gather(self.item_era, item_row)))
                 | ((flat_kind == "g") & (self.phrases.lookup(phrase_key) > 0)))
        rows = tf.shape(row, out_type=which.dtype)[0]
        wrong = tf.math.unsorted_segment_max(tf.cast(~holds, tf.int32), which, rows) > 0
        return matched, matched & ~wrong


_PATTERNS = frame_patterns()
