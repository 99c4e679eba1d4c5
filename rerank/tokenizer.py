"""BERT pair tokenization in the graph (tensorflow-text), so that a SavedModel takes raw text.

`PairTokenizer.encode_pairs` turns (user context, candidate) strings into the
`[CLS] a [SEP] b [SEP]` inputs of a BERT cross-encoder with TF ops only; exported, it needs nothing
but TensorFlow and tensorflow-text. It reproduces the Hugging Face fast BERT tokenizer
(`reference_tokenizer`, what the checkpoints were trained with): the same text normalization,
WordPiece ids and `longest_first` truncation. Two known differences, both far from catalog text:
characters added to Unicode after the tables of HF's `tokenizers` crate, and words of at most 100
characters but over 100 UTF-8 bytes (HF's limit counts characters, tensorflow-text's bytes; past
the limit both give `[UNK]`).
"""

from __future__ import annotations

import json
import os
import pathlib

import tensorflow as tf
import tensorflow_text as text

from rerank import checkpoint

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
MAX_BYTES_PER_WORD = 100  # HF BERT's max_input_chars_per_word; the same for ASCII words
SPECIAL_TOKENS_PER_PAIR = 3  # [CLS] a [SEP] b [SEP]


def read_vocab(vocab_file: str | os.PathLike) -> list[str]:
    """The WordPiece vocabulary, one token a line, id = line number; checks the special tokens."""
    vocab_file = pathlib.Path(vocab_file)
    if not vocab_file.is_file():
        raise checkpoint.CheckpointError(f"{vocab_file}: file not found; a BERT checkpoint "
                                         "directory needs the vocab.txt its model was trained with")
    vocab = vocab_file.read_text(encoding="utf-8").splitlines()
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise checkpoint.CheckpointError(
            f"{vocab_file}: no special token(s) {', '.join(missing)} among its {len(vocab)} "
            "lines; is it a BERT WordPiece vocabulary?")
    return vocab


def normalize(texts: tf.Tensor, lower_case: bool = True) -> tf.Tensor:
    """HF's `BertNormalizer` in TF ops: drop invalid UTF-8, control and format characters (tabs
    and line breaks stay, they split words) and, for uncased models, strip accents (NFD, drop
    nonspacing marks) and lowercase character by character.

    tensorflow-text's own `lower_case_nfd_strip_accents` case-folds with NFKC instead, which turns
    ligatures (`ﬁ`), `ß` and `…` into tokens HF never produced for these checkpoints.
    """
    texts = tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace",
                                         replacement_char=0xFFFD)
    texts = tf.strings.regex_replace(texts, r"[^\P{C}\t\n\r]|\x{FFFD}", "")
    if not lower_case:
        return texts
    texts = text.normalize_utf8(texts, "NFD")
    texts = tf.strings.regex_replace(texts, r"\p{Mn}", "")
    # ICU lowercases a word-final capital sigma to ς; HF, one character at a time, always to σ.
    texts = tf.strings.regex_replace(texts, "Σ", "σ")
    return tf.strings.lower(texts, encoding="utf-8")


def truncation_lengths(first: tf.Tensor, second: tf.Tensor,
                       budget: int) -> tuple[tf.Tensor, tf.Tensor]:
    """How many tokens of each segment HF's `longest_first` keeps so that both fit in `budget`.

    The longer segment is cut first; once both would be cut, each gets half the budget, the odd
    token going to the longer one (to the second on a tie). Ported from the `tokenizers` crate's
    `truncate_encodings`, which the fast tokenizers run.
    """
    budget = tf.constant(budget, first.dtype)
    shorter = tf.minimum(first, second)
    longer_limit = tf.where(shorter > budget, shorter, tf.maximum(shorter, budget - shorter))
    halve = shorter + longer_limit > budget
    shorter_limit = tf.where(halve, budget // 2, shorter)
    longer_limit = tf.where(halve, budget // 2 + budget % 2, longer_limit)
    first_limit = tf.where(first > second, longer_limit, shorter_limit)
    second_limit = tf.where(first > second, shorter_limit, longer_limit)
    fits = first + second <= budget
    return (tf.where(fits, first, tf.minimum(first, first_limit)),
            tf.where(fits, second, tf.minimum(second, second_limit)))


class PairTokenizer(tf.Module):
    """WordPiece ids of text and BERT pair inputs, built from a checkpoint's `vocab.txt`."""

    def __init__(self, vocab_file: str | os.PathLike, lower_case: bool = True,
                 name: str | None = None):
        super().__init__(name=name)
        vocab = read_vocab(vocab_file)
        self.lower_case = lower_case
        self.pad_id, self.cls_id, self.sep_id = map(vocab.index, ("[PAD]", "[CLS]", "[SEP]"))
        self.wordpiece = text.FastBertTokenizer(
            vocab=vocab, max_bytes_per_word=MAX_BYTES_PER_WORD, token_out_type=tf.int64,
            unknown_token="[UNK]", lower_case_nfd_strip_accents=False)  # `normalize` does that

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> PairTokenizer:
        """Reads `vocab.txt`, and `do_lower_case` from `tokenizer_config.json` if there is one."""
        directory = pathlib.Path(directory)
        return cls(directory / "vocab.txt", lower_case=_do_lower_case(directory))

    def tokenize(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """string [B] -> int64 [B, (tokens)], without special tokens."""
        return self.wordpiece.tokenize(normalize(texts, self.lower_case))

    def encode_pairs(self, first: tf.Tensor, second: tf.Tensor,
                     max_length: int) -> dict[str, tf.Tensor]:
        """string [B], string [B] -> `input_ids`, `attention_mask`, `token_type_ids`, each int32
        [B, max_length]: `[CLS] first [SEP] second [SEP]`, truncated longest-first, then padded
        on the right with `[PAD]`."""
        if max_length < SPECIAL_TOKENS_PER_PAIR:
            raise ValueError(f"max_length must be at least {SPECIAL_TOKENS_PER_PAIR} ([CLS] and "
                             f"two [SEP]), got {max_length}")
        first, second = self.tokenize(first), self.tokenize(second)
        first_keep, second_keep = truncation_lengths(
            first.row_lengths(), second.row_lengths(), max_length - SPECIAL_TOKENS_PER_PAIR)
        ids, segments = text.combine_segments(
            [_keep_first(first, first_keep), _keep_first(second, second_keep)],
            start_of_sequence_id=self.cls_id, end_of_segment_id=self.sep_id)
        input_ids, attention_mask = text.pad_model_inputs(ids, max_length, pad_value=self.pad_id)
        token_type_ids, _ = text.pad_model_inputs(segments, max_length, pad_value=0)
        outputs = {"input_ids": input_ids, "attention_mask": attention_mask,
                   "token_type_ids": token_type_ids}
        return {key: tf.ensure_shape(tf.cast(value, tf.int32), [None, max_length])
                for key, value in outputs.items()}


def reference_tokenizer(directory: str | os.PathLike, lower_case: bool | None = None):
    """The Hugging Face fast tokenizer of a checkpoint directory, from the same `vocab.txt`;
    `lower_case` defaults to `do_lower_case` in `tokenizer_config.json`.

    It treats special tokens typed in text (`"[SEP]"`) as text, as the graph does, so that user
    text cannot forge segment boundaries.
    """
    import transformers  # only the training side needs it

    directory = pathlib.Path(directory)
    read_vocab(directory / "vocab.txt")
    return transformers.BertTokenizerFast(
        vocab_file=str(directory / "vocab.txt"), split_special_tokens=True,
        do_lower_case=_do_lower_case(directory) if lower_case is None else lower_case)


def _do_lower_case(directory: pathlib.Path) -> bool:
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return True
    return bool(json.loads(config.read_text()).get("do_lower_case", True))


def _keep_first(tokens: tf.RaggedTensor, keep: tf.Tensor) -> tf.RaggedTensor:
    """The first `keep[i]` tokens of each row i."""
    positions = tf.ragged.range(tokens.row_lengths())
    return tf.ragged.boolean_mask(tokens, positions < tf.expand_dims(keep, 1))
