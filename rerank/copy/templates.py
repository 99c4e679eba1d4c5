"""The copy corpus and its templates: what the copywriter reads (a prompt of facts) and learns to write.

How the corpus is made. Every example is one (user, item) interaction of the run's split's
*training* rows; nothing from the test split is read. The prompt holds only facts: the item's
title, year and categories (`data.ItemFacts`, from the dataset card's `text` fields), and one or
two titles the user liked in training data, drawn from their eight best, never the item itself;
about one prompt in twelve has no liked titles, as an unknown user's has at serving time. At
serving time the prompt's titles are the item's reasons, best first: the user's liked history
items whose item-item weight raised its final score most (`rerank.pairs.PairTexts.reasons`), and a
frame that cites one title cites the first. "Liked" is a rating of 4 or more (MovieLens: 4 or 5
stars), best first by rating, then most recent, then item ID; on implicit feedback (every rating
1) it is the user's newest interactions. The target is one line of copy written from that prompt
by templates: 66 sentence frames (21 without the user's titles, 32 with one, 13 with two), whose
slots are filled from pools of phrasings: the categories (adjective and noun forms
of one or two of the item's categories: 2-5 of each for a MovieLens genre, `GENRE_WORDS`, the
lower-cased category word itself for any other), the year (15 forms such as `from 1995`,
`released in 1995`, and the era, `mid-'90s`; left out when unknown), verbs and connecting
phrases (9-22 each).
A seeded `random.Random` makes every choice, so the same seed gives the same corpus. Titles are
in display form (`The Usual Suspects` for the catalog's `Usual Suspects, The`).

Titles are slot tokens. In the prompt each title follows a slot token (`<|title|>`,
`<|liked1|>`...`<|liked3|>`); in the target the model writes the slot token where the title
goes, and serving replaces it with the title (`lexicalize`, and the same in the exported graph).
The model never spells a title, so it cannot misspell one or write one from memory; what it must
get right is which slot to use, and that the prompt has it (a slot the prompt lacks fails the
check). Decoding is shorter too: a title is one token. Measured with a copy-the-title model of
the same size and training (literal titles in the target): 80% grounded and 10.6% hallucinated
titles, against the slot model's numbers in docs/results.md (Copy).

What it means for quality. The copywriter learns to restate facts it is given, in the voice of
the templates: it cannot say anything true that the prompt does not hold (plot, cast, why the
film is good), and its variety is bounded by the template pools, which the sampler recombines
but does not extend. Its copy is grounded in the sense checked here: the item's title present,
and no other catalog title that is not in the prompt. Categories and years are copied from the
prompt by the model and are not checked, so a wrong category word is possible, though rare. A
pretrained GPT-2 fine-tuned on this corpus keeps more fluent English but learns the same frames.
The check every line passes is `grounding`.
"""

from __future__ import annotations

import dataclasses
import random

from rerank.copy.grounding import TitleMatcher, display_title, spoken
from towers import data

HIGH_RATING = 4.0  # "liked" on explicit feedback (MovieLens: 4 or 5 stars); implicit: any row
LIKED_POOL = 8  # training prompts draw their liked titles from the user's best this many
MAX_LIKED = 2  # titles in a prompt: serving cites the reasons, the (up to) two history items
# that raise the item's final score most (`rerank.pairs.PairTexts.reasons`)
NO_LIKED_RATE = 1 / 12  # share of training prompts without liked titles (cold-start users)
PROMPT_HEAD = "Liked:"
# The prompt's words before the item's title and its categories, for any catalog: the words the
# ML-100K models were trained and measured with.
ITEM_HEAD = "Film:"
CATEGORIES_HEAD = "Genres:"
MAX_DRAWS = 20  # draws of one corpus line that may fail the grounding check before it is an error
# Slot tokens: the copy names titles through these, and serving puts the title (with its leading
# space) in their place, so a title is never spelled by the model (see the module docstring).
TITLE_SLOT = "<|title|>"
LIKED_SLOTS = ("<|liked1|>", "<|liked2|>")
SLOTS = (TITLE_SLOT, *LIKED_SLOTS)

# Adjective and noun phrasings of an item with no category the copy may say.
NO_CATEGORY_WORDS = (("offbeat", "curious"), ("film", "movie", "oddity"))
# Adjective and noun phrasings of each MovieLens genre (GroupLens names); any other category is
# phrased with its own word (`category_words`).
GENRE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Action": (("action-packed", "action", "explosive", "high-octane"),
               ("action film", "action movie", "actioner", "action ride")),
    "Adventure": (("adventure", "adventurous", "globe-trotting", "swashbuckling"),
                  ("adventure", "adventure story", "quest", "escapade")),
    "Animation": (("animated", "hand-drawn", "cartoon"),
                  ("animated feature", "cartoon", "animated tale")),
    "Children's": (("family", "kid-friendly", "all-ages", "family-friendly"),
                   ("family film", "kids' movie", "family adventure", "children's film")),
    "Comedy": (("comic", "funny", "witty", "zany", "lighthearted"),
               ("comedy", "laugh-out-loud comedy", "romp", "farce")),
    "Crime": (("crime", "gritty crime", "gangland", "hard-boiled"),
              ("crime story", "crime film", "caper", "crime saga")),
    "Documentary": (("documentary", "real-life", "true-life"),
                    ("documentary", "nonfiction film", "true story")),
    "Drama": (("dramatic", "heartfelt", "moving", "poignant", "absorbing"),
              ("drama", "character drama", "character study", "tearjerker")),
    "Fantasy": (("fantasy", "magical", "enchanted", "otherworldly"),
                ("fantasy", "fairy tale", "fable")),
    "Film-Noir": (("noir", "shadowy", "hard-bitten", "smoky"),
                  ("film noir", "noir", "noir classic")),
    "Horror": (("horror", "scary", "creepy", "blood-curdling", "spooky"),
               ("horror film", "horror movie", "chiller", "fright fest", "creature feature")),
    "Musical": (("musical", "song-filled", "toe-tapping", "tuneful"),
                ("musical", "song-and-dance show", "sing-along")),
    "Mystery": (("mystery", "puzzling", "twisty", "enigmatic"),
                ("mystery", "whodunit", "puzzle", "detective story")),
    "Romance": (("romantic", "swooning", "tender", "love-struck"),
                ("romance", "love story", "romantic tale", "date movie")),
    "Sci-Fi": (("sci-fi", "science-fiction", "futuristic", "space-age"),
               ("sci-fi film", "science-fiction story", "space opera", "sci-fi tale")),
    "Thriller": (("suspenseful", "tense", "edge-of-your-seat", "nerve-jangling"),
                 ("thriller", "nail-biter", "suspense yarn", "pulse-pounder")),
    "War": (("war", "wartime", "battlefield", "combat"),
            ("war film", "war story", "war epic", "battle saga")),
    "Western": (("western", "frontier", "dusty", "gunslinging"),
                ("western", "oater", "frontier tale", "horse opera")),
    "unknown": NO_CATEGORY_WORDS,
}
GENERIC_NOUNS = ("pick", "find", "favorite")  # noun phrasings of another category: `jazz pick`
NOUNS = ("film", "movie", "picture", "feature", "flick", "gem", "treat", "pick", "outing",
          "crowd-pleaser", "watch", "ride")

# Sentence frames. {T}: the item's title; {L}, {L2}: liked titles; {ag}/{g}: category phrase with
# and without article; {y}: " from 1995"-style year phrase (empty when the year is unknown);
# {py}: " (1995)"; {era}: "mid-'90s "; the rest are phrasing pools.
FRAMES_NONE = (
    "{T}{py} is {ag} worth {seeing}.",
    "Discover {T}, {ag}{y}.",
    "{Verb} {T}: {ag}{y}.",
    "Looking for {ag}? {T}{y} {delivers}.",
    "{T} is {era}{g} at its best.",
    "{Tonight}: {T}{py}, {ag} that {lands}.",
    "{T}{py} is {ag} {worth}.",
    "In the mood for {ag}? {Verb} {T}{y}.",
    "{T} offers {era}{g} {worth}.",
    "{Verb} {T}{py}, {ag} that {lands}.",
    "Up next: {T}, {ag}{y}.",
    "{T}{py}: pure {era}{g}.",
    "{Verb} {T}{py} tonight.",
    "{T}{py}, {ag} to {see}.",
    "Say yes to {T}, {ag}{y}.",
    "{ag_cap}{y}? {T} {delivers}.",
    "{T}{py}: {ag} that {lands}, {worth}.",
    "Need {ag}? {Verb} {T}, {worth}.",
    "{Tonight}: {T}, {ag}{y}.",
    "{T}{y} is {ag} that {lands}.",
    "{T}: {ag}{y} that {lands}.",
)
FRAMES_ONE = (
    "{Because}, {verb} {T}, {ag}{y}.",
    "{T}{py} is {ag} for anyone who {liked} {L}.",
    "{Loved} {L}? {T} is {ag}{y} to {see}.",
    "{Loved} {L}? {Verb} {T}{py}.",
    "{Loved} {L}? {T}{py} {delivers}.",
    "{T} brings {aeg} to fans of {L}.",
    "Next up after {L}: {T}, {ag}{y}.",
    "{L} fans, meet {T}: {ag}{y}.",
    "{Because}, {T}{py} is {ag} {worth}.",
    "You gave {L} high marks; {T} is {ag}{y}.",
    "{T} is {ag}{y}, a natural pick after {L}.",
    "If {L} hit the spot, {verb} {T}, {ag}{y}.",
    "{Because}, here is {ag}{y}: {T}.",
    "{L} was a hit with you; {T} is {ag} that {lands}.",
    "More {era}{g} for fans of {L}: {T}.",
    "Because {L} clicked, {T}{py} might too.",
    "{T}{y}, for anyone who {liked} {L}.",
    "{L} lovers, {verb} {T}{py}.",
    "{T}{py} is {aeg} in the vein of {L}.",
    "{Because}, {T} should be {next}.",
    "For fans of {L}: {T}{py}, {ag}.",
    "{T}{py} pairs well with {L}.",
    "From {L} to {T}: {ag}{y}.",
    "{Verb} {T}, {ag}{y}; {L} fans approve.",
    "{Because}, {T}{py} {delivers}.",
    "{T}{py} is {ag} for anyone who {liked} {L}, {worth}.",
    "Like {L}, {T} is {ag} that {lands}.",
    "{L} gave you a good night; {T}{py} should too.",
    "{Tonight}: {T}, {ag}{y}, for the fan of {L}.",
    "{Loved} {L}? {T} is {ag} that {lands}.",
    "Same spirit as {L}: {T}, {ag}{y}.",
    "{Tonight}, after {L}: {T}{py}.",
)
FRAMES_TWO = (
    "If {L} and {L2} are your kind of films, {T} should be {next}: {ag}{y}.",
    "{T} is {ag}{y} for fans of {L} and {L2}.",
    "Between {L} and {L2}, you will want {T}, {ag}{y}.",
    "{Loved} {L} and {L2}? {Verb} {T}{py}.",
    "{T}{py}: {ag} for the viewer who {liked} {L} and {L2}.",
    "After {L} and {L2}, {verb} {T}, {ag}{y}.",
    "{L}, {L2}, and now {T}: {ag}{y}.",
    "Fans of {L} and {L2} {should} {T}{py}.",
    "{T}{py} sits right between {L} and {L2}.",
    "Part {L}, part {L2}: {T}, {ag}{y}.",
    "You {liked} {L} and {L2}; {verb} {T}{py} next.",
    "{T} is {ag}{y} with a bit of {L} and a dash of {L2}.",
    "Picked from your love of {L} and {L2}: {T}{py}.",
)
YEARS = (" from {0}", " released in {0}", " made in {0}", " that opened in {0}",
         " first screened in {0}", " dating from {0}", " of {0} vintage", " that premiered in {0}",
         " from the class of {0}", " out since {0}", " from back in {0}", " that hit screens in {0}",
         " which debuted in {0}", " first shown in {0}", " straight out of {0}")
_VERBS = ("check out", "try", "watch", "queue up", "don't miss", "catch", "stream", "revisit",
          "give a chance to", "make time for", "put on", "discover", "line up", "save a night for",
          "cue up", "rent", "pick up", "settle in with", "treat yourself to", "fire up",
          "unwind with", "seek out")
POOLS = {
    "Verb": tuple(verb[0].upper() + verb[1:] for verb in _VERBS),
    "verb": _VERBS,
    "see": ("see", "watch next", "add to your list", "try tonight", "catch soon", "stream next",
            "save for the weekend", "put on next", "cue up soon", "enjoy this week",
            "watch this weekend", "see next", "rent tonight", "share with friends"),
    "seeing": ("seeing", "a look", "your time", "a spot on your list", "watching tonight",
               "a rewatch", "the popcorn", "a slot this weekend", "an evening",
               "a Sunday afternoon", "the time", "a double bill", "a second look",
               "your attention"),
    "delivers": ("delivers", "fits the bill", "is the answer", "will not disappoint",
                 "hits the mark", "is a safe bet", "should satisfy", "comes through",
                 "does the job", "answers the call", "never lets up", "stands tall",
                 "earns its place", "rewards you"),
    "lands": ("lands", "holds up", "keeps you hooked", "stays with you", "works", "delights",
              "grips", "charms", "surprises", "entertains", "sticks the landing", "pays off",
              "sings", "shines", "sparkles", "clicks", "soars", "resonates"),
    "worth": ("worth a watch", "you will want to see", "to queue up next", "worth your evening",
              "made for you", "worth a look", "to savor", "for a cozy night", "for the weekend",
              "worth the popcorn", "worth staying up for", "for your next night in",
              "worth a rental", "to share with friends", "you should not skip"),
    "next": ("next", "your next watch", "next on your list", "tonight's pick", "up next",
             "the next one", "first in line", "on deck", "your next pick"),
    "Tonight": ("Tonight's pick", "Our pick", "Tonight", "This weekend", "Movie night",
                "Your next watch", "Worth a look", "Our suggestion", "Next in your queue",
                "Today's pick", "Weekend plan"),
    "Loved": ("Loved", "Enjoyed", "Liked", "Into", "Fond of", "A fan of", "Still thinking about",
              "Hooked on", "Crazy about", "Big on", "Moved by", "Won over by"),
    "liked": ("liked", "loved", "enjoyed", "rated highly", "could not stop talking about",
              "adored", "raved about", "gave five stars", "rewatched", "treasured"),
    "should": ("should try", "will enjoy", "ought to see", "can count on", "will want",
               "may love", "are sure to like", "should queue up", "will want to see",
               "must see"),
    "Because": ("Because you enjoyed {L}", "Since you rated {L} highly", "As a fan of {L}",
                "Having loved {L}", "Since {L} is one of your favorites",
                "Given how much you liked {L}", "If you liked {L}", "Since {L} worked for you",
                "With {L} among your favorites", "Since {L} made your list",
                "Because {L} won you over", "Since you gave {L} top marks",
                "After the high rating you gave {L}", "Since {L} is in your top picks",
                "Knowing you enjoyed {L}", "As someone who loved {L}"),
}


@dataclasses.dataclass(frozen=True)
class CopyExample:
    """One corpus line: the prompt's facts (IDs), the target the model learns (titles as slot
    tokens) and the copy line it stands for."""

    user_id: str
    item_id: str
    liked: tuple[str, ...]  # item IDs whose titles the prompt holds, in prompt order
    template: str  # what the model writes: "<|title|> is a ... for fans of<|liked2|>."
    target: str  # the copy line: "Toy Story is a ... for fans of Fargo."


def catalog(dataset: data.Dataset) -> dict[str, data.ItemFacts]:
    """Every item's facts (title, year, categories) by ID, in ID order: what prompts, titles and
    fallback lines are made of. Empty category values are dropped."""
    ids = [str(item) for item in dataset.item_ids()]
    return {fact.item_id: dataclasses.replace(
        fact, categories=tuple(category for category in fact.categories if category))
        for fact in dataset.facts(ids)}


def top_items(train: data.Interactions, count: int = LIKED_POOL,
              implicit: bool = False) -> dict[str, tuple[str, ...]]:
    """Each user's liked training items, best first, at most `count`, each item once; users
    without one are left out. Explicit feedback: ratings of at least HIGH_RATING, by rating, then
    the most recent, then item ID. Implicit feedback (every rating 1): the newest interactions."""
    ratings, times, items, users = (train.rating.tolist(), train.timestamp.tolist(),
                                    train.item_id.tolist(), train.user_id.tolist())
    order = sorted(range(len(train)), key=lambda r: (-ratings[r], -times[r], items[r]))
    best: dict[str, list[str]] = {}
    for row in order:
        if implicit or ratings[row] >= HIGH_RATING:
            chosen = best.setdefault(str(users[row]), [])
            if len(chosen) < count and items[row] not in chosen:
                chosen.append(str(items[row]))
    return {user: tuple(chosen) for user, chosen in best.items()}


def liked_piece(item: data.ItemFacts, position: int) -> str:
    """A liked title as the prompt holds it, after the slot token that names it in the copy."""
    return f"{LIKED_SLOTS[position]} {display_title(item.title)};"


def film_piece(item: data.ItemFacts) -> str:
    """The item's facts as the prompt holds them; the model writes its copy after this. A year or
    categories the item lacks are left out."""
    year = "" if item.year == data.UNKNOWN_YEAR else f" ({item.year})"
    categories = f" {CATEGORIES_HEAD} {', '.join(item.categories)}." if item.categories else ""
    return f" {ITEM_HEAD}{TITLE_SLOT} {display_title(item.title)}{year}.{categories} Copy:"


def prompt_pieces(item: data.ItemFacts, liked: list[data.ItemFacts]) -> list[str]:
    """The prompt as pieces that are tokenized one by one and concatenated, in training and in the
    exported graph alike (which holds each piece already tokenized)."""
    return [PROMPT_HEAD, *(liked_piece(other, n) for n, other in enumerate(liked)), film_piece(item)]


def lexicalize(template: str, item: data.ItemFacts, liked: list[data.ItemFacts]) -> str:
    """The copy line: each slot token replaced by its title, with the space the slot stands for."""
    for slot, title in zip(SLOTS, [item, *liked]):
        template = template.replace(slot, " " + display_title(title.title))
    return template.strip()


def write_copy(item: data.ItemFacts, liked: list[data.ItemFacts], rng: random.Random) -> str:
    """One line of copy for `item` that uses its facts and, when there are any, a liked title;
    titles are slot tokens that stand for " " + the title (`lexicalize` fills them in). The
    item's categories are the ones the copy may say (`spoken`)."""
    # Titles cost one token each to decode, and add the most variety: use liked titles often.
    draw = rng.random()
    frames = (FRAMES_NONE if not liked else FRAMES_TWO if len(liked) >= 2 and draw < 0.55
              else FRAMES_ONE)
    frame = rng.choice(frames)
    # The prompt's titles come best reason first: a frame citing one title cites the first.
    first, second = [*range(len(liked)), None, None][:2]
    slots = {name: rng.choice(pool) for name, pool in POOLS.items()}
    phrase, with_article = category_phrase(item, rng)
    known = item.year != data.UNKNOWN_YEAR
    slots.update(
        T=TITLE_SLOT, g=phrase, ag=with_article,
        ag_cap=with_article[0].upper() + with_article[1:],
        y=rng.choice(YEARS).format(item.year) if known else "",
        py=f" ({item.year})" if known else "", era=f"{era(item.year)} " if known else "",
        aeg=article(f"{era(item.year)} {phrase}" if known else phrase),
        L=LIKED_SLOTS[first] if first is not None else "",
        L2=LIKED_SLOTS[second] if second is not None else "")
    line = frame.format(**slots).format(**slots)  # a pool entry ({Because}) has an {L} of its own
    # Every title in a frame follows a space (the line itself follows "Copy:" and one), and the
    # slot token stands for that space too.
    return (" " + line).replace(" <|", "<|")


def category_words(category: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) for one category: `GENRE_WORDS`' for a MovieLens genre, else the
    lower-cased category word itself (`Jazz` -> `jazz`, `jazz pick`), so any catalog has copy."""
    if category in GENRE_WORDS:
        return GENRE_WORDS[category]
    word = category.lower()
    return (word,), tuple(f"{word} {noun}" for noun in GENERIC_NOUNS)


def category_phrase(item: data.ItemFacts, rng: random.Random) -> tuple[str, str]:
    """(`sci-fi thriller`, `a sci-fi thriller`) from one or two of the item's categories;
    `NO_CATEGORY_WORDS` when it has none."""
    words = [category_words(category) for category in item.categories] or [NO_CATEGORY_WORDS]
    if len(words) >= 2 and rng.random() < 0.6:
        first, second = rng.sample(words, 2)
        phrase = f"{rng.choice(first[0])} {rng.choice(second[1])}"
    elif rng.random() < 0.5:
        phrase = rng.choice(rng.choice(words)[1])
    else:
        phrase = f"{rng.choice(rng.choice(words)[0])} {rng.choice(NOUNS)}"
    return phrase, article(phrase)


def article(phrase: str) -> str:
    """`a comedy`, `an animated feature`, `an early-'90s drama`."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def era(year: str) -> str:
    """`1995` -> `mid-'90s`; centuries other than the 1900s keep four digits (`early 2000s`)."""
    value = int(year)
    part = ("early", "early", "early", "early", "mid", "mid", "mid", "late", "late", "late")[value % 10]
    decade = value // 10 * 10
    return f"{part}-'{decade % 100:02d}s" if decade < 2000 else f"{part} {decade}s"


def build_corpus(dataset: data.Dataset, train: data.Interactions, size: int,
                 seed: int = 42) -> list[CopyExample]:
    """`size` examples from the training rows `train` of `dataset`, in a seeded random order (see
    the module docstring)."""
    rng = random.Random(seed)
    items = catalog(dataset)
    best = top_items(train, implicit=dataset.implicit)
    rows = list(range(len(train)))
    rng.shuffle(rows)
    matcher = TitleMatcher(items)
    corpus = []
    for row in rows[:size]:
        user, item_id = str(train.user_id[row]), str(train.item_id[row])
        pool = [other for other in best.get(user, ()) if other != item_id]
        count = 0 if rng.random() < NO_LIKED_RATE else rng.choice((1, 2))
        liked = rng.sample(pool, min(count, len(pool)))
        item = items[item_id]
        liked_items = [items[i] for i in liked]
        said = spoken(item, matcher)
        # A frame or pool phrase can read as a title of another catalog ("Discover"): draw again.
        for _ in range(MAX_DRAWS):
            template = write_copy(said, liked_items, rng)
            target = lexicalize(template, item, liked_items)
            present, foreign = matcher.check(target, item_id, liked)
            if present and not foreign:
                break
        else:
            raise ValueError(f"{dataset.path}: no corpus line for item {item_id!r} passes the "
                             f"grounding check in {MAX_DRAWS} draws (title present: {present}, "
                             f"other titles: {foreign}): {target!r}")
        corpus.append(CopyExample(user, item_id, tuple(liked), template, target))
    return corpus


