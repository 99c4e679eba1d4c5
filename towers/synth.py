"""Synthetic datasets with planted structure, in the RecBole atomic format `towers.data` reads.

The generative story: each item belongs to one of T topics and has a Zipf popularity rank within
it; each user has a sparse Dirichlet-like preference over topics and a log-normal activity. An
interaction picks a time in the user's active window, a topic from the user's preference, then an
item of that topic by popularity (a user takes an item at most once). Item titles use the topic's
own words with probability `text_signal` (else neutral words), and the first category token is the
topic's with probability `category_signal`, so text and categories carry part of the preference and
popularity is a real but weaker baseline. New items (`new_item_share`) exist only in the newest
`NEW_WINDOW` of the time span; `text_only` leaves the preference visible in the titles alone.
`new_words` names topics by real English words of one field each (sea, reef, harbor...) and gives
new items only words no old item has (whale, dolphin...): a model that learned words from
interactions knows nothing of a new item, one that reads language can still see its topic.

Every per-user random number is a hash of (seed, stream, user, index), so users are generated in
chunks (memory grows with the chunk, not with users x items) and the files do not depend on the
chunk size. The files are written under temporary names and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import re
import tempfile

import numpy as np
import tqdm

from towers import files

log = logging.getLogger(__name__)

START = 1_577_836_800  # 2020-01-01 UTC, the first timestamp
SPAN = 2 * 365 * 86_400  # seconds of activity: two years
NEW_WINDOW = 0.15  # new items exist only in this newest share of the time span
NEW_BOOST = 4.0  # a new item's popularity weight multiplier once it exists (new releases are hot)
MODEL_ROUNDS = 12  # redraws from the user's preference when a pick repeats a taken item
FILL_ROUNDS = 8  # then redraws uniformly over the items that exist at that time
WORDS_PER_TOPIC = 3  # topic adjectives and topic nouns each

# Topic words are taken in order, 3 adjectives and 3 nouns per topic; more topics than these lists
# cover get made-up words. Neutral words are shared by every topic.
TOPIC_ADJECTIVES = """Amber Azure Brass Cedar Cobalt Copper Crimson Crystal Emerald Frozen Gilded
    Golden Ivory Jade Lunar Marble Obsidian Scarlet Silver Solar Velvet Violet Iron Ashen Coral
    Dusky Electric Feral Gentle Hollow Misty Nimble Radiant Rusty Sacred Sunken Tidal Wooden Bitter
    Burning Endless Fallen Fierce Honest Lucky Merry Northern Paper Quiet Rapid Restless Royal
    Sleeping Southern Sudden Swift Wandering Wild Winter Woven""".split()
TOPIC_NOUNS = """Anchor Arrow Badger Banner Beacon Bridge Canyon Castle Cipher Comet Compass Crown
    Delta Desert Dragon Ember Falcon Feather Forest Fortress Garden Glacier Harbor Hawk Horizon
    Island Lantern Meadow Mirror Monarch Mountain Oracle Orchard Otter Phoenix Pilgrim Raven River
    Saddle Sparrow Spire Summit Temple Thistle Thunder Tiger Tower Valley Voyager Willow Wolf Acorn
    Basin Cinder Dune Fjord Grove Heron Lagoon Quarry""".split()
NEUTRAL_ADJECTIVES = """Bright Broken Calm Dark Distant First Great Hidden Last Little Lone Lost
    Midnight New Old Pale Secret Silent Strange True""".split()
NEUTRAL_NOUNS = """City Door Field Gate Heart House Key Light Road Room Season Shadow Sky Star
    Stone Storm Street Water Window World""".split()
KINDS = """Affair Ballad Chronicle Diary Files Journey Legacy Legend Letters Notes Project Promise
    Question Riddle Saga Song Story Tale Trial Years""".split()
CATEGORIES = """adventure biography comedy crime documentary drama family fantasy history horror
    music mystery nature romance science sport thriller travel war western""".split()
SYLLABLES = "ka lo mi ren tor vel zan dri sol fen bar qui nor pel sta".split()
# `new_words`: one field of everyday English per topic, each word one token of the BERT vocabulary;
# old items take their words from the first OLD_WORDS, new items from the rest.
FIELDS = [line.split() for line in """
    sea wave tide reef harbor sailor ship anchor shore island whale dolphin coral pearl beach voyage
    mars planet galaxy rocket orbit comet moon astronaut cosmos meteor asteroid satellite telescope alien eclipse gravity
    bread cheese soup kitchen chef recipe feast bakery dinner pie cake butter honey pasta spice wine
    lyrics melody guitar piano drum violin choir rhythm concert symphony jazz chorus tune band singer opera
    soldier battle army sword siege tank general rifle trench enemy fortress cannon invasion warrior victory weapon
    tree oak pine leaf moss fern branch deer wolf owl bear woodland timber squirrel bark grove
    detective murder thief police robbery gun prison gangster criminal suspect killer witness crime lawyer jury cop
    romance kiss wedding affection bride lover passion darling sweetheart valentine marriage honeymoon date flirt embrace desire
    football soccer tennis goal stadium team coach player match champion race boxing golf hockey baseball athlete
    doctor nurse hospital surgeon patient medicine clinic fever virus cure surgery injury pill vaccine disease health
    """.strip().splitlines()]
OLD_WORDS = 10


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """The planted structure; `synthesize` and the CLI flags map onto it one to one."""

    users: int
    items: int
    interactions: int  # exact, unless a user's picks keep repeating (then fewer; logged)
    seed: int = 0
    topics: int = 20  # latent topics; items are split evenly between them
    concentration: float = 0.1  # Dirichlet alpha of user preferences: small = few topics per user
    popularity: float = 1.0  # Zipf exponent of item popularity within a topic (0 = flat)
    activity_skew: float = 1.5  # log-normal sigma of user activity (1.5: medians ~1/3 of the mean)
    text_signal: float = 0.6  # chance that each of a title's two content words is its topic's
    category_signal: float = 0.7  # chance that an item's first category is its topic's
    explicit: bool = False  # add a 1-5 rating, higher on the user's preferred topics
    new_item_share: float = 0.0  # items that exist only in the newest NEW_WINDOW of time
    text_only: bool = False  # flat popularity and random categories: only titles carry topics
    new_words: bool = False  # topics as English word fields; new items use words no old item has

    def __post_init__(self):
        for name in ("users", "items", "interactions", "topics"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.interactions < self.users:
            raise ValueError(f"interactions ({self.interactions}) must be at least users "
                             f"({self.users}): every user has at least one interaction")
        if self.interactions > self.users * max_per_user(self.items):
            raise ValueError(f"interactions ({self.interactions}) must be at most users x "
                             f"{max_per_user(self.items)} (half the items, a user's most)")
        if self.topics > self.items:
            raise ValueError(f"topics ({self.topics}) must be at most items ({self.items})")
        for name in ("text_signal", "category_signal"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.new_words and self.topics > len(FIELDS):
            raise ValueError(f"new_words names at most {len(FIELDS)} topics (its word fields), "
                             f"got topics={self.topics}")
        if not 0.0 <= self.new_item_share <= 0.5:
            raise ValueError(f"new_item_share must be between 0 and 0.5, got {self.new_item_share}")
        for name in ("concentration", "activity_skew"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.popularity >= 0:
            raise ValueError(f"popularity must be >= 0, got {self.popularity}")


def max_per_user(items: int) -> int:
    return max(1, items // 2)


def synthesize(out_dir: str | os.PathLike, users: int, items: int, interactions: int, *,
               seed: int = 0, name: str | None = None,
               topics: int = SynthConfig.topics,
               concentration: float = SynthConfig.concentration,
               popularity: float = SynthConfig.popularity,
               activity_skew: float = SynthConfig.activity_skew,
               text_signal: float = SynthConfig.text_signal,
               category_signal: float = SynthConfig.category_signal,
               explicit: bool = False, new_item_share: float = 0.0, text_only: bool = False,
               new_words: bool = False, chunk_users: int = 20_000,
               progress: bool | None = None) -> pathlib.Path:
    """Writes `<out>/<name>.inter`, `<name>.item` and the card `<name>.yaml` (name default
    `synth`) and returns the folder. `chunk_users` bounds memory and does not change the files;
    `progress` None shows a bar on a terminal only."""
    config = SynthConfig(users, items, interactions, seed, topics, concentration, popularity,
                         activity_skew, text_signal, category_signal, explicit, new_item_share,
                         text_only, new_words)
    return write(config, out_dir, name or "synth", chunk_users, progress)


def write(config: SynthConfig, out_dir: str | os.PathLike, name: str = "synth",
          chunk_users: int = 20_000, progress: bool | None = None) -> pathlib.Path:
    """`synthesize` for a ready config."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"name must be letters, digits, '-' or '_', got {name!r}")
    if chunk_users < 1:
        raise ValueError(f"chunk_users must be >= 1, got {chunk_users}")
    out = pathlib.Path(out_dir)
    others = sorted(p.name for p in out.glob("*.inter") if p.name != f"{name}.inter")
    if others:
        raise files.DataError(f"{out}: already holds {', '.join(others)}; write the synthetic "
                              "dataset to its own folder (a folder holds one dataset)")
    out.mkdir(parents=True, exist_ok=True)
    catalog = Catalog.build(config)
    counts = activity(config)
    # The interactions stream into a temporary file; the item file and card follow, and the
    # `.inter` rename comes last, so a crash leaves no half-written file and no new dataset.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.inter.", dir=out)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            written = _write_interactions(config, catalog, counts, handle, chunk_users, progress)
        files.write_atomic(out / f"{name}.item", item_file(catalog))
        files.write_atomic(out / f"{name}.yaml", card(config, name, written).encode())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, out / f"{name}.inter")
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    if written < config.interactions:
        log.warning("%s: %d of %d interactions: some users kept repeating taken items",
                    out, written, config.interactions)
    log.info("%s: %d users, %d items, %d interactions", out, config.users, config.items, written)
    return out


def _write_interactions(config: SynthConfig, catalog: Catalog, counts: np.ndarray, handle,
                        chunk_users: int, progress: bool | None) -> int:
    header = ["user_id:token", "item_id:token", "timestamp:float"]
    header += ["rating:float"] if config.explicit else []
    handle.write(("\t".join(header) + "\n").encode())
    written = 0
    with tqdm.tqdm(total=config.users, unit="user", desc="synth", disable=(
            None if progress is None else not progress)) as bar:
        for first in range(0, config.users, chunk_users):
            rows = generate(config, catalog, first, counts[first:first + chunk_users])
            columns = [rows["user"] + 1, rows["item"] + 1, rows["time"]]
            columns += [rows["rating"]] if config.explicit else []
            handle.write(format_rows(columns))
            written += len(rows["user"])
            bar.update(min(chunk_users, config.users - first))
    return written


def item_file(catalog: Catalog) -> bytes:
    """`item_id`, `title` and `categories` (both token_seq), one line per item, IDs from 1."""
    lines = ["item_id:token\ttitle:token_seq\tcategories:token_seq"]
    lines += [f"{i}\t{title}\t{categories}" for i, (title, categories) in
              enumerate(zip(catalog.titles, catalog.categories), start=1)]
    return ("\n".join(lines) + "\n").encode()


def card(config: SynthConfig, name: str, written: int) -> str:
    """The dataset card (docs/data.md), headed by the command that rewrites the same files."""
    flags = [f"--users {config.users}", f"--items {config.items}",
             f"--interactions {config.interactions}", f"--name {name}", f"--seed {config.seed}"]
    for field in dataclasses.fields(SynthConfig)[4:]:
        value = getattr(config, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags.append(f"{flag} {value}")
    rating = "rating" if config.explicit else "null"
    what = ("titles alone carry the topics (flat popularity, random categories)"
            if config.text_only else "titles and categories carry part of the topics")
    what += ("; new items' titles use words no old item has" if config.new_words else "")
    return f"""# Synthetic data with planted structure (towers/synth.py): {written} interactions
# of {config.users} users with {config.items} items in {config.topics} latent topics; {what}.
# Rewrite it with: cascade data synth {' '.join(flags)}
name: {name}
fields: {{user_id: user_id, item_id: item_id, rating: {rating}, timestamp: timestamp}}
item_features:
  title: {{kind: text, max_tokens: 6, min_count: 2}}
  categories: categories
text:
  title: title
  categories: categories
  item: "{{title}}; {{categories}}"
split: random
"""


def from_arguments(args: argparse.Namespace) -> pathlib.Path:
    """Writes the dataset the flags of `add_arguments` describe."""
    config = SynthConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SynthConfig)})
    return write(config, args.out, args.name, args.chunk_users,
                 progress=False if args.no_progress else None)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `cascade data synth`."""
    parser.add_argument("--users", type=int, required=True, help="number of users")
    parser.add_argument("--items", type=int, required=True, help="number of items")
    parser.add_argument("--interactions", type=int, required=True,
                        help="number of interactions (at least one per user)")
    parser.add_argument("--out", default="data/synth",
                        help="folder to write (default: %(default)s)")
    parser.add_argument("--name", default="synth", help="dataset name (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    for flag, kind, text in (
            ("topics", int, "latent topics"),
            ("concentration", float, "Dirichlet alpha of user preferences (small: focused users)"),
            ("popularity", float, "Zipf exponent of popularity within a topic"),
            ("activity-skew", float, "log-normal sigma of user activity"),
            ("text-signal", float, "chance that a title word is its topic's"),
            ("category-signal", float, "chance that an item's first category is its topic's"),
            ("new-item-share", float, "share of items that exist only in the newest "
                                      f"{NEW_WINDOW:.0%}% of the time span")):
        default = getattr(SynthConfig, flag.replace("-", "_"))  # the dataclass default
        parser.add_argument(f"--{flag}", type=kind, default=default,
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--explicit", action="store_true", help="add a 1-5 rating column")
    parser.add_argument("--text-only", action="store_true",
                        help="topics visible only in titles: flat popularity, random categories")
    parser.add_argument("--new-words", action="store_true",
                        help=f"topics as English word fields (at most {len(FIELDS)}); new items' "
                             "titles use words no old item has")
    parser.add_argument("--chunk-users", type=int, default=20_000,
                        help="users generated at once; bounds memory (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: the same for a user whatever chunk generates it

_MASK = (1 << 64) - 1


def _mix_int(x: int) -> int:
    """splitmix64's finaliser on a Python int."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (multiplication wraps modulo 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, stream: int, user: np.ndarray, index: np.ndarray) -> np.ndarray:
    """float64 in (0, 1), a hash of (seed, stream, user, index); broadcasts user and index."""
    base = np.uint64(_mix_int(_mix_int(seed + 1) ^ (stream * 0x9E3779B97F4A7C15 & _MASK)))
    key = _mix(np.asarray(user, np.uint64) * np.uint64(0xD1B54A32D192ED03) + base)
    key = _mix(key ^ (np.asarray(index, np.uint64) * np.uint64(0x9E3779B97F4A7C15)))
    return ((key >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53


# Streams of `uniform`; each redraw round r uses ROW + 3r, ROW + 3r + 1, ROW + 3r + 2.
PREFERENCE_A, PREFERENCE_B, WINDOW, RATING, ROW = 1, 2, 3, 4, 10


# ---------------------------------------------------------------------------------------------
# Items and users


@dataclasses.dataclass(frozen=True)
class TopicTable:
    """Items grouped by topic with each topic's cumulative popularity (topic t in (t, t + 1])."""

    items: np.ndarray  # int64 [n], item indices sorted by topic
    cdf: np.ndarray  # float64 [n]
    start: np.ndarray  # int64 [T], each topic's first position in `items`
    end: np.ndarray  # int64 [T]

    @classmethod
    def build(cls, topic: np.ndarray, weight: np.ndarray, topics: int) -> TopicTable:
        chosen = np.flatnonzero(weight > 0)
        chosen = chosen[np.argsort(topic[chosen], kind="stable")]
        t = topic[chosen]
        end = np.searchsorted(t, np.arange(topics), side="right")
        start = np.searchsorted(t, np.arange(topics), side="left")
        cum = np.cumsum(weight[chosen])
        before = np.concatenate([[0.0], cum])[start]  # the mass of earlier topics
        total = np.concatenate([[0.0], cum])[end] - before
        cdf = t + (cum - before[t]) / np.where(total > 0, total, 1.0)[t]
        return cls(chosen, cdf, start, end)

    def sample(self, topic: np.ndarray, u: np.ndarray) -> np.ndarray:
        """An item of each `topic` by popularity (`u` uniform); every topic has items."""
        position = np.searchsorted(self.cdf, topic + u, side="right")
        return self.items[np.clip(position, self.start[topic], self.end[topic] - 1)]  # rounding


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Each item's hidden topic, popularity rank, newness and text, and the sampling tables."""

    topic: np.ndarray  # int64 [I]
    rank: np.ndarray  # int64 [I], popularity rank within the topic (0 = most popular)
    new: np.ndarray  # bool [I]
    old: np.ndarray  # int64 [n], indices of the items that are not new
    before: TopicTable  # old items: picks before the new items exist
    after: TopicTable  # every item, new ones boosted
    titles: list[str]
    categories: list[str]

    @classmethod
    def build(cls, config: SynthConfig) -> Catalog:
        rng = np.random.default_rng([config.seed, 1])
        count, topics = config.items, config.topics
        topic = rng.permutation(np.arange(count) % topics)  # even topics, random IDs
        order = np.lexsort((rng.random(count), topic))
        rank = np.empty(count, np.int64)
        rank[order] = np.arange(count) - np.searchsorted(topic[order], topic[order])
        exponent = 0.0 if config.text_only else config.popularity
        weight = (rank + 1.0) ** -exponent
        new = (rng.random(count) < config.new_item_share) & (rank > 0)  # keep a topic's top old
        titles = (_field_titles(rng, topic, new, config) if config.new_words
                  else _titles(rng, topic, config))
        categories = _categories(rng, topic, config)
        return cls(topic, rank, new, np.flatnonzero(~new),
                   TopicTable.build(topic, np.where(new, 0.0, weight), topics),
                   TopicTable.build(topic, np.where(new, NEW_BOOST * weight, weight), topics),
                   titles, categories)


def _words(real: list[str], count: int, number: int = len(SYLLABLES)) -> list[str]:
    """`count` distinct capitalised words: `real` first, then made-up ones (`Lomi`, `Lotor`...)
    spelling `number`, `number` + 1... in syllables."""
    words, seen = list(real[:count]), set(real[:count])
    while len(words) < count:
        digits, rest = [], number  # `number` in base len(SYLLABLES)
        while rest:
            digits.append(rest % len(SYLLABLES))
            rest //= len(SYLLABLES)
        word = "".join(SYLLABLES[(d + k) % len(SYLLABLES)] for k, d in enumerate(digits))
        number += 1
        if word.capitalize() not in seen:
            words.append(word.capitalize())
            seen.add(word.capitalize())
    return words


def _titles(rng: np.random.Generator, topic: np.ndarray, config: SynthConfig) -> list[str]:
    """`Adjective Noun Kind`, each content word its topic's with chance `text_signal`; repeats
    get a number (`Amber Harbor Chronicle 2`)."""
    count, per = len(topic), WORDS_PER_TOPIC
    columns = []
    for real, neutral, number in ((TOPIC_ADJECTIVES, NEUTRAL_ADJECTIVES, len(SYLLABLES)),
                                  (TOPIC_NOUNS, NEUTRAL_NOUNS, len(SYLLABLES) ** 2)):
        own = np.array(_words(real, per * config.topics, number))  # nouns: 3+ syllables
        pick_own = rng.random(count) < config.text_signal
        own_word = own[topic * per + rng.integers(0, per, count)]
        neutral_word = np.array(neutral)[rng.integers(0, len(neutral), count)]
        columns.append(np.where(pick_own, own_word, neutral_word))
    kinds = np.array(KINDS)[rng.integers(0, len(KINDS), count)]
    titles, seen = [], {}
    for adjective, noun, kind in zip(*columns, kinds):
        title = f"{adjective} {noun} {kind}"
        seen[title] = seen.get(title, 0) + 1
        titles.append(title if seen[title] == 1 else f"{title} {seen[title]}")
    return titles


def _field_titles(rng: np.random.Generator, topic: np.ndarray, new: np.ndarray,
                  config: SynthConfig) -> list[str]:
    """`Word Word Kind`: each of the two words its topic's field word with chance `text_signal`
    (old items: the field's first OLD_WORDS; new items: the rest), else a neutral noun; repeats
    get a number."""
    count = len(topic)
    fields = np.array([[word.capitalize() for word in field] for field in FIELDS])
    columns = []
    for _ in range(2):
        own = np.where(new, OLD_WORDS + rng.integers(0, fields.shape[1] - OLD_WORDS, count),
                       rng.integers(0, OLD_WORDS, count))
        neutral = np.array(NEUTRAL_NOUNS)[rng.integers(0, len(NEUTRAL_NOUNS), count)]
        columns.append(np.where(rng.random(count) < config.text_signal, fields[topic, own], neutral))
    kinds = np.array(KINDS)[rng.integers(0, len(KINDS), count)]
    titles, seen = [], {}
    for first, second, kind in zip(*columns, kinds):
        title = f"{first} {second} {kind}" if first != second else f"{first} {kind}"
        seen[title] = seen.get(title, 0) + 1
        titles.append(title if seen[title] == 1 else f"{title} {seen[title]}")
    return titles


def _categories(rng: np.random.Generator, topic: np.ndarray, config: SynthConfig) -> list[str]:
    """1-3 category tokens; the first is the topic's with chance `category_signal` (never under
    `text_only`), the others random."""
    count = len(topic)
    names = [w.lower() for w in _words([c.capitalize() for c in CATEGORIES], config.topics)]
    signal = 0.0 if config.text_only else config.category_signal
    first = np.where(rng.random(count) < signal, topic, rng.integers(0, config.topics, count))
    extra = rng.integers(0, config.topics, (count, 2))
    extras = rng.integers(0, 3, count)  # 0-2 more tokens
    out = []
    for row in range(count):
        tokens = [first[row], *extra[row, :extras[row]]]
        out.append(" ".join(names[t] for t in dict.fromkeys(tokens)))
    return out


def activity(config: SynthConfig) -> np.ndarray:
    """int64 [U] interactions per user: 1 + a multinomial share of the rest by log-normal weights,
    capped at `max_per_user` (the excess goes to the others); sums to `interactions`."""
    rng = np.random.default_rng([config.seed, 2])
    weight = rng.lognormal(0.0, config.activity_skew, config.users)
    counts = 1 + rng.multinomial(config.interactions - config.users, weight / weight.sum())
    cap = max_per_user(config.items)
    while (excess := int(np.maximum(counts - cap, 0).sum())) > 0:
        counts = np.minimum(counts, cap)
        room = np.where(counts < cap, weight, 0.0)
        counts += rng.multinomial(excess, room / room.sum())
    return counts.astype(np.int64)


def preferences(config: SynthConfig, users: np.ndarray) -> np.ndarray:
    """float64 [n, T], each user's topic distribution: Gamma(alpha) = Gamma(alpha + 1) U^(1/alpha),
    with Exp(1) for Gamma(alpha + 1), normalised (close to Dirichlet(alpha) for small alpha)."""
    topics = np.arange(config.topics)
    a = uniform(config.seed, PREFERENCE_A, users[:, None], topics)
    b = uniform(config.seed, PREFERENCE_B, users[:, None], topics)
    gamma = -np.log(a) * np.exp(np.log(b) / config.concentration) + 1e-300
    return gamma / gamma.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Interactions


def generate(config: SynthConfig, catalog: Catalog, first: int,
             counts: np.ndarray) -> dict[str, np.ndarray]:
    """The interactions of users first .. first + len(counts) - 1 (0-based), each user's rows in
    time order: `user`, `item` (0-based), `time` (seconds) and `rating` (explicit only)."""
    n = len(counts)
    users = first + np.arange(n)
    theta = preferences(config, users)
    cumulative = np.cumsum(theta, axis=1)
    flat = (cumulative / cumulative[:, -1:] + np.arange(n)[:, None]).ravel()  # user u in (u, u+1]
    window = uniform(config.seed, WINDOW, users[:, None], np.arange(2))
    length = window[:, 1]
    begin = window[:, 0] * (1.0 - length)
    need = counts.copy()
    taken_user, taken_item, taken_time = [], [], []
    taken_keys = np.empty(0, np.int64)
    for round_ in range(MODEL_ROUNDS + FILL_ROUNDS):
        if not need.any():
            break
        draws = need + need // 2 + 1 if round_ else need + need // 4 + 1
        draws = np.where(need > 0, draws, 0)
        user = np.repeat(np.arange(n), draws)
        index = np.arange(len(user)) - np.repeat(np.cumsum(draws) - draws, draws)
        stream = ROW + 3 * round_
        when = begin[user] + length[user] * uniform(config.seed, stream, users[user], index)
        late = when >= 1.0 - NEW_WINDOW
        u_item = uniform(config.seed, stream + 2, users[user], index)
        if round_ < MODEL_ROUNDS:
            u_topic = uniform(config.seed, stream + 1, users[user], index)
            position = np.searchsorted(flat, user + u_topic, side="right")
            topic = np.clip(position - user * config.topics, 0, config.topics - 1)
            item = np.where(late, catalog.after.sample(topic, u_item),
                            catalog.before.sample(topic, u_item))
        else:  # uniform over the items that exist at that time
            old = catalog.old[np.minimum((u_item * len(catalog.old)).astype(np.int64),
                                         len(catalog.old) - 1)]
            item = np.where(late, np.minimum((u_item * config.items).astype(np.int64),
                                             config.items - 1), old)
        keys = user.astype(np.int64) * config.items + item
        _, firsts = np.unique(keys, return_index=True)
        firsts.sort()
        fresh = firsts[~_contains(taken_keys, keys[firsts])]
        owner = user[fresh]
        rank = np.arange(len(fresh)) - np.searchsorted(owner, owner)
        fresh = fresh[rank < need[owner]]
        taken_user.append(user[fresh])
        taken_item.append(item[fresh])
        taken_time.append(when[fresh])
        taken_keys = np.sort(np.concatenate([taken_keys, keys[fresh]]))
        need -= np.bincount(user[fresh], minlength=n)
    user, item = np.concatenate(taken_user), np.concatenate(taken_item)
    seconds = START + np.floor(np.concatenate(taken_time) * SPAN).astype(np.int64)
    order = np.lexsort((item, seconds, user))
    rows = {"user": users[user[order]], "item": item[order], "time": seconds[order]}
    if config.explicit:
        rows["rating"] = _ratings(config, theta, user[order], catalog.topic[rows["item"]],
                                  rows["user"])
    return rows


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    position = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
    return (sorted_keys[position] == keys) if len(sorted_keys) else np.zeros(len(keys), bool)


def _ratings(config: SynthConfig, theta: np.ndarray, local: np.ndarray, topic: np.ndarray,
             users: np.ndarray) -> np.ndarray:
    """1-5: 1.5 + 3.5 x (preference for the item's topic / the user's top preference), plus
    logistic noise of scale 0.5, rounded."""
    affinity = theta[local, topic] / theta[local].max(axis=1)
    index = np.arange(len(local)) - np.searchsorted(local, local)  # row within its user
    u = uniform(config.seed, RATING, users, index)
    return np.clip(np.rint(1.5 + 3.5 * affinity + 0.5 * np.log(u / (1 - u))), 1, 5).astype(np.int64)


def format_rows(columns: list[np.ndarray]) -> bytes:
    """Tab-separated decimal lines of non-negative integer columns, built as one byte array (about
    ten times faster than formatting each row in Python)."""
    parts, masks = [], []
    n = len(columns[0])
    for k, column in enumerate(columns):
        column = np.asarray(column, np.int64)
        width = len(str(int(column.max()))) if n else 1
        powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
        mask = column[:, None] >= powers
        mask[:, -1] = True  # zero prints one digit
        parts += [((column[:, None] // powers) % 10 + 48).astype(np.uint8),
                  np.full((n, 1), 10 if k == len(columns) - 1 else 9, np.uint8)]
        masks += [mask, np.ones((n, 1), bool)]
    return np.concatenate(parts, axis=1)[np.concatenate(masks, axis=1)].tobytes()
