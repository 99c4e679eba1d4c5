"""The copywriter's served graph: IDs in, grounded copy out, with nothing but TF ops inside.

    copywriter/<version>/  serving_default(user_id string[B], item_ids string[B, N]) -> copy string[B, N]

`CopywriterModule` is the graph; `serving.export.export_copywriter` writes it as a versioned TF
Serving model (warmup request, record, models.config), `serving.export.export` writes it with the
other stages and inside the one-call cascade, and `rerank.copy.evaluation` evaluates and times it.
This module imports nothing from `serving`.

Everything the copy depends on is a table in the graph: item ID -> row, user ID -> the user's
best training items, each catalog item's prompt pieces already tokenized (the prompt is only
ever catalog text, so tokenizing it at export with the run's own tokenizer is exact, and the
graph assembles prompts by gathering and concatenating those token rows), the detokenizer (each
byte-level BPE token's bytes; decoding is a gather and a string join), the catalog titles for
the grounding check, and the pieces of the deterministic fallback line. Generation is the
`decoding.Decoder` loop over `attempts` samples per line in one batch (the first sample that
passes every check is served, the fallback line only when none does), a `tf.while_loop` without XLA, so the signature runs on stock TF
Serving; it needs no op beyond core TensorFlow.

An unknown `user_id` gets copy without liked titles; an unknown or empty item ID gets "" (so a
ragged request can be padded with ""). Each line's sampling randomness is a hash of (user ID,
item ID, `salt`) alone, the salt being the export version (`serving.export` sets it before saving;
0 otherwise), so a user's line for an item is the same in any request of one export: alone, in a
batch of users, at any position, and inside the one-call cascade.
"""

from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

from rerank import pairs
from rerank.config import RerankerConfig
from rerank.copy import claims, copywriter, decoding, grounding, templates
from towers import data

MODEL_NAME = "copywriter"
USER_ID = tf.TensorSpec([None], tf.string, name="user_id")
ITEM_IDS = tf.TensorSpec([None, None], tf.string, name="item_ids")
REASONS = tf.TensorSpec([None, None, templates.MAX_LIKED], tf.string, name="reasons")


class Detokenizer(tf.Module):
    """Token ids -> text, exactly: byte-level BPE tokens are byte strings, so text is their join;
    a slot token becomes its row's text for that slot (a title with its leading space)."""

    def __init__(self, tokenizer, slot_ids: list[int]):
        super().__init__()
        self.table = tf.constant(copywriter.token_bytes(tokenizer))
        self.slot_ids = slot_ids

    def __call__(self, tokens, slot_text=None):
        """tokens int32 [R, T], slot_text string [R, len(slot_ids)] -> text string [R]."""
        pieces = tf.gather(self.table, tokens)
        if slot_text is not None:
            for column, slot in enumerate(self.slot_ids):
                pieces = tf.where(tokens == slot, slot_text[:, column:column + 1], pieces)
        text = tf.strings.reduce_join(pieces, axis=-1)
        # Sampling can cut a multi-byte character; control characters would confuse the check.
        text = tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace")
        return tf.strings.strip(tf.strings.regex_replace(text, r"[\x00-\x1f]", " "))


class CopywriterModule(tf.Module):
    """(user_id [B], item_ids [B, N]) -> copy [B, N]; `details` also returns what the check saw."""

    def __init__(self, decoder: decoding.Decoder, tokenizer, tables: copywriter.PromptTables,
                 items: dict[str, data.ItemFacts], reasons: pairs.PairTexts):
        """`items`: the catalog's facts by ID (`templates.catalog`); `reasons`: the re-ranker's
        tables, whose item-item term names each item's reasons (`PairTexts.reasons`)."""
        super().__init__()
        matcher = grounding.TitleMatcher(items)
        self.decoder, self.eos_id = decoder, tables.eos_id
        self.detokenize = Detokenizer(tokenizer, tables.slot_ids)
        self.check = grounding.TitleCheck(matcher)
        self.claims = claims.ClaimCheck([grounding.spoken(items[item], matcher)
                                         for item in tables.item_ids])
        self.reasons = reasons
        self.liked_slot_ids = tf.constant(tables.slot_ids[1:], tf.int32)
        self.item_rows = _table(tables.item_ids, np.arange(len(tables.item_ids)), -1)
        self.head = tf.constant(tables.head, tf.int32)
        # [position * items + item row, (tokens)]: a liked title's piece depends on its position.
        self.liked_tokens = tf.ragged.constant(
            [piece for position in tables.liked for piece in position], tf.int32)
        self.items = len(tables.item_ids)
        self.item_ids = tuple(tables.item_ids)
        self.film_tokens = tf.ragged.constant(tables.film, tf.int32)
        values = [items[item] for item in tables.item_ids]
        self.item_title = tf.constant([matcher.item_title[item] for item in tables.item_ids], tf.int32)
        self.slot_titles = tf.constant(
            [" " + grounding.display_title(item.title) for item in values] + [""])  # last: none
        self.item_fallback = tf.constant(
            [grounding.item_fallback(item, matcher) for item in values])
        self.user_fallback = tf.constant([grounding.user_fallback(item) for item in values])
        # Part of every line's sampling key: the export version, so each export draws its own lines.
        self.salt = tf.Variable(0, dtype=tf.int64, trainable=False, name="salt")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, loaded=None, dataset: data.Dataset | None = None,
                 reasons: pairs.PairTexts | None = None) -> CopywriterModule:
        """Built from a trained run: `run_dir` is the retrieval run directory (e.g. runs/ml100k)
        that holds `copywriter/` (`cascade train copywriter --run RUN`); `loaded`: what
        `copywriter.load_run` returned, if at hand. With the run's `dataset` and the re-ranker's
        tables (`reasons`, the re-ranker module's own, to share them in one graph) at hand, only
        the model is read.

        `serve(user_id [B], item_ids [B, N]) -> {"copy": [B, N]}` can be called inside another
        `tf.function` (the one-call cascade does, on its top-N item IDs) and saved with it."""
        if loaded is None and dataset is not None and reasons is not None:
            loaded = (*copywriter.load_model(run_dir), dataset, None)
        record, model, tokenizer, dataset, split = loaded or copywriter.load_run(run_dir)
        decoder = decoding.Decoder(model, copywriter.config_of(record), tokenizer.eos_token_id)
        items = templates.catalog(dataset)
        tables = copywriter.PromptTables.build(tokenizer, items)
        return cls(decoder, tokenizer, tables, items,
                   reasons if reasons is not None else reason_tables(run_dir, dataset, split))

    @tf.function(input_signature=[USER_ID, ITEM_IDS])
    def serve(self, user_id, item_ids):
        details = self.details(user_id, item_ids)
        return {"copy": details["copy"], "reasons": details["reasons"]}

    @tf.function(input_signature=[USER_ID, ITEM_IDS, REASONS])
    def with_reasons(self, user_id, item_ids, reasons):
        """Copy for items ranked elsewhere, citing the caller's reasons (history item IDs
        [B, N, 2], best first, "" for none; IDs the catalog lacks are dropped): the `cascade`'s
        lines are this function's, given the reasons its ranking found (`rerank.reasons`)."""
        details = self.write(user_id, item_ids, reasons)
        return {"copy": details["copy"], "reasons": details["reasons"]}

    def other_signatures(self) -> dict:
        """Signatures the export saves beside `serving_default`."""
        return {"with_reasons": self.with_reasons}

    @tf.function(input_signature=[USER_ID, ITEM_IDS])
    def details(self, user_id, item_ids):
        """The served copy and, per line, the first sample's text and the check's findings on it,
        and `attempt`: which sample is served (0, 1, ...; -1 when the fallback is)."""
        return self.write(user_id, item_ids)

    def write(self, user_id: tf.Tensor, item_ids: tf.Tensor, reasons: tf.Tensor | None = None
              ) -> dict[str, tf.Tensor]:
        """`details` (callable inside another `tf.function`); `reasons` [B, N, 2]: the liked
        titles to cite, else the item-item term's (`PairTexts.reasons`)."""
        shape = tf.shape(item_ids)
        tf.debugging.assert_equal(tf.shape(user_id)[0], shape[0],
                                  message="user_id and item_ids must have the same batch size")
        items = tf.reshape(item_ids, [-1])  # R = B * N rows
        item_row = self.item_rows.lookup(items)
        row = tf.maximum(item_row, 0)
        users = tf.repeat(user_id, shape[1])
        if reasons is None:
            reason_ids = self.reasons.reasons(users, items, templates.MAX_LIKED)  # [R, 2]
        else:
            tf.debugging.assert_equal(tf.shape(reasons)[:2], shape, message=(
                "reasons must be [B, N, 2]: one pair of history item IDs per item of item_ids"))
            reason_ids = tf.reshape(reasons, [-1, templates.MAX_LIKED])
            reason_ids = tf.ragged.boolean_mask(
                reason_ids, self.item_rows.lookup(reason_ids) >= 0).to_tensor(
                    "", shape=[None, templates.MAX_LIKED])
        liked = self.item_rows.lookup(reason_ids)
        liked = tf.ragged.boolean_mask(liked, liked >= 0)  # [R, (<=2)] item rows
        ids, mask = self._prompts(row, liked)
        keys = tf.strings.join([users, items, tf.strings.as_string(
            self.salt)], separator="\x1f")  # [R]: the line's randomness, whatever else is asked
        # Every sample of every line in one decoding batch, attempt-major: rows [a * R + r].
        attempts = self.decoder.config.attempts
        keys = tf.concat([keys] + [keys + f"\x1f{a}" for a in range(1, attempts)], axis=0)
        tokens, finished = self.decoder.generate(
            tf.tile(ids, [attempts, 1]), tf.tile(mask, [attempts, 1]), keys)
        row_a, liked_a = tf.tile(row, [attempts]), tf.concat([liked] * attempts, axis=0)
        slot_rows = tf.concat([row_a[:, None], liked_a.to_tensor(
            self.items, shape=[None, templates.MAX_LIKED])], axis=1)  # [A*R, 3]; missing -> ""
        text = self.detokenize(tokens, tf.gather(self.slot_titles, slot_rows))
        # The same line with titles as slot tokens: what the frame and fact check reads.
        skeleton = self.detokenize(tokens, tf.tile(tf.constant([claims.SLOT_TEXT]),
                                                   [tf.shape(tokens)[0], 1]))
        # A liked-title slot the prompt does not have would leave a hole in the line.
        used = tf.reduce_any(tokens[:, :, None] == self.liked_slot_ids, axis=1)  # [A*R, 2]
        has = tf.range(templates.MAX_LIKED)[None] < tf.cast(liked_a.row_lengths(), tf.int32)[:, None]
        slots_ok = ~tf.reduce_any(used & ~has, axis=1)
        present, foreign = self._grounding(text, row_a, liked_a)
        well_formed, claims_hold = self.claims(skeleton, row_a)
        passed = present & ~foreign & finished & slots_ok & claims_hold  # [A*R]
        attempt, chosen = first_passing(passed, attempts)
        rows = tf.shape(row)[0]
        generated = attempt >= 0
        fallback = tf.strings.join([tf.gather(self.item_fallback, row), tf.where(
            liked.row_lengths() > 0,
            tf.gather(self.user_fallback, liked.to_tensor(0, shape=[None, 1])[:, 0]), "")])
        served = tf.where(generated, tf.gather(text, chosen), fallback)
        served = tf.where(item_row >= 0, served, "")
        # The reasons the served line cites: the served sample's liked slots, or the fallback's
        # first title.
        has = has[:rows]
        cited = tf.where(generated[:, None], tf.gather(used, chosen) & has,
                         (tf.range(templates.MAX_LIKED)[None] == 0) & has)
        cited_ids = tf.where(cited & (item_row >= 0)[:, None], reason_ids, "")
        # What the checks saw is reported for each line's first sample (attempt 0): the model's
        # own error rates before any check or resampling.
        text, skeleton, present, foreign, finished, slots_ok, well_formed, claims_hold = (
            value[:rows] for value in (text, skeleton, present, foreign, finished, slots_ok,
                                       well_formed, claims_hold))

        def grid(values):
            return tf.reshape(values, tf.concat([shape, tf.shape(values)[1:]], axis=0))
        return {"copy": grid(served), "reasons": grid(cited_ids), "generated": grid(text),
                "skeleton": grid(skeleton), "title_present": grid(present),
                "other_title": grid(foreign), "finished": grid(finished),
                "slots_ok": grid(slots_ok), "well_formed": grid(well_formed),
                "claims_hold": grid(claims_hold), "fallback": grid(~generated),
                "attempt": grid(attempt),
                "known_item": grid(item_row >= 0), "candidate_reasons": grid(reason_ids)}

    def _prompts(self, row, liked):
        """Token ids and mask [R, P], prompts padded on the left with EOS."""
        rows = tf.shape(row)[0]
        head = tf.RaggedTensor.from_tensor(tf.tile(self.head[None], [rows, 1]))
        positions = tf.ragged.range(tf.cast(liked.row_lengths(), liked.dtype)).flat_values
        index = liked.with_flat_values(positions * self.items + liked.flat_values)
        pieces = tf.gather(self.liked_tokens, index).merge_dims(1, 2)
        prompt = tf.concat([head, pieces, tf.gather(self.film_tokens, row)], axis=1)
        lengths = tf.cast(prompt.row_lengths(), tf.int32)
        dense = prompt.to_tensor(self.eos_id)  # [R, width], padded on the right
        width = tf.shape(dense)[1]
        source = tf.range(width)[None] - (width - lengths)[:, None]  # shift each row right
        mask = source >= 0
        ids = tf.where(mask, tf.gather(dense, tf.maximum(source, 0), batch_dims=1), self.eos_id)
        return ids, tf.cast(mask, tf.int32)

    def _grounding(self, text, row, liked):
        """(item title present [R], a catalog title outside the prompt present [R])."""
        found = self.check(text)
        which = found.value_rowids()
        titles = found.flat_values
        is_item = titles == tf.gather(tf.gather(self.item_title, row), which)
        liked_titles = tf.gather(self.item_title, liked).to_tensor(
            -2, shape=[None, templates.MAX_LIKED])
        allowed = is_item | tf.reduce_any(titles[:, None] == tf.gather(liked_titles, which), axis=1)
        rows = tf.shape(row, out_type=which.dtype)[0]
        present = tf.math.unsorted_segment_max(tf.cast(is_item, tf.int32), which, rows) > 0
        foreign = tf.math.unsorted_segment_max(tf.cast(~allowed, tf.int32), which, rows) > 0
        return present, foreign


def reason_tables(run_dir: str | os.PathLike, dataset: data.Dataset,
                  split: data.Split) -> pairs.PairTexts:
    """The tables whose item-item term names the reasons: the run's re-ranker's own (so the
    reasons are those of the served ranking), else built from the training rows with the
    re-ranker's defaults (a run without a re-ranker)."""
    from rerank import cross_encoder

    path = pathlib.Path(run_dir) / cross_encoder.RERANKER_DIR / cross_encoder.TEXTS_FILE
    if path.exists():
        return pairs.PairTexts.load(path)
    return pairs.PairTexts.build(dataset, split.train, dataset.user_ids(), dataset.item_ids(), 0,
                                 RerankerConfig.ease_l2, RerankerConfig.ease_neighbours,
                                 cross_encoder.liked_rating(dataset))


def first_passing(passed: tf.Tensor, attempts: int) -> tuple[tf.Tensor, tf.Tensor]:
    """passed bool [A * R] (attempt-major: row a * R + r is line r's sample a) -> (attempt int32
    [R]: the first sample of each line that passed, -1 when none did; chosen int32 [R]: the row
    of that sample, or of sample 0 when none passed)."""
    passes = tf.reshape(passed, [attempts, -1])  # [A, R]
    first = tf.argmax(tf.cast(passes, tf.int32), axis=0, output_type=tf.int32)  # 0 when none
    attempt = tf.where(tf.reduce_any(passes, axis=0), first, -1)
    return attempt, first * tf.shape(passes)[1] + tf.range(tf.shape(passes)[1])


def _table(keys, values, default: int) -> tf.lookup.StaticHashTable:
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(keys)), tf.constant(np.asarray(values, np.int32))), default)

