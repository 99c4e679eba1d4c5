"""The GPT-2 copywriter's model and training.

Read top to bottom: the tokenizer (a byte-level BPE trained on the copy corpus, or the
checkpoint's own); the prompt tables that turn (user, item) into token ids; the model (a compact
GPT-2 from scratch, or any local Hugging Face-format GPT-2 directory, fine-tuned); training with
Keras `fit`; the run directory. The corpus is `rerank.copy.templates`, the sampling loop
`rerank.copy.decoding`, the served graph `rerank.copy.graph`, its evaluation
`rerank.copy.evaluation`; the versioned TF Serving export is `serving.export.export_copywriter`.

Everything a run makes lives in `<run_dir>/copywriter/`: `config.json`, `model/` (a Hugging
Face-format GPT-2 directory with its tokenizer, itself usable as `checkpoint=`), `heldout.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf
import tf_keras as keras

from rerank.copy import templates
from rerank.config import CopywriterConfig
from towers import data
from towers import runs
from towers import train as towers_train

log = logging.getLogger(__name__)

SUBDIR = "copywriter"
CONFIG_FILE = "config.json"
MODEL_DIR = "model"
HELDOUT_FILE = "heldout.jsonl"
METRICS_FILE = runs.METRICS_FILE
EOS = "<|endoftext|>"  # GPT-2's one special token: start of prompt, end of copy, padding


class CopywriterError(ValueError):
    """A copywriter run or checkpoint is missing or cannot be used; the message says what to do."""


# --- Tokenizer -----------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme) trained on `texts`, as a `transformers` fast tokenizer.

    Byte-level BPE decodes exactly by concatenating each token's bytes, which the exported graph
    does with a table lookup and a string join.
    """
    import tokenizers
    import transformers

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS, *templates.SLOTS], show_progress=False)
    return transformers.GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
        pad_token=EOS, additional_special_tokens=list(templates.SLOTS))


def load_tokenizer(directory: str | os.PathLike):
    import transformers

    directory = pathlib.Path(directory)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise CopywriterError(f"{directory}: no tokenizer (tokenizer.json or vocab.json + "
                              "merges.txt); a GPT-2 checkpoint needs the tokenizer it was trained with")
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(str(directory))
    if tokenizer.eos_token_id is None:
        raise CopywriterError(f"{directory}: the tokenizer has no end-of-text token")
    missing = [slot for slot in templates.SLOTS if slot not in tokenizer.get_vocab()]
    if missing:  # a checkpoint not trained here: the slot tokens are new (and so are embeddings)
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return tokenizer


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes (special tokens decode to nothing): the in-graph detokenizer table."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    table = [b""] * len(tokenizer)
    special = set(tokenizer.all_special_ids)
    for token, index in tokenizer.get_vocab().items():
        if index not in special and all(char in decoder for char in token):
            table[index] = bytes(decoder[char] for char in token)
    return table


# --- Prompts -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptTables:
    """Every prompt piece, tokenized once: the same ids in training and in the exported graph."""

    item_ids: list[str]
    head: list[int]  # [EOS] + "Liked:"
    liked: list[list[list[int]]]  # [position in the prompt][item]: as a liked title
    film: list[list[int]]  # per item, its facts and "Copy:"
    eos_id: int
    slot_ids: list[int]  # token ids of templates.SLOTS
    row: dict[str, int]  # item ID -> index into the lists above

    @classmethod
    def build(cls, tokenizer, items: dict[str, data.ItemFacts]) -> PromptTables:
        """From the catalog's facts by ID (`templates.catalog`)."""
        def encode(texts):
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
        values = list(items.values())
        return cls(list(items), [tokenizer.eos_token_id, *encode([templates.PROMPT_HEAD])[0]],
                   [encode([templates.liked_piece(item, position) for item in values])
                    for position in range(templates.MAX_LIKED)],
                   encode([templates.film_piece(item) for item in values]),
                   tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(list(templates.SLOTS)),
                   {item: row for row, item in enumerate(items)})

    def longest_prompt(self) -> int:
        """An upper bound on the length of any served prompt: any items of the catalog can be an
        item's reasons, so the longest liked piece at each position."""
        pieces = sum(max(map(len, position), default=0) for position in self.liked)
        return len(self.head) + pieces + max(map(len, self.film))

    def prompt(self, item_id: str, liked) -> list[int]:
        pieces = [self.liked[position][self.row[other]] for position, other in enumerate(liked)]
        return self.head + [token for piece in pieces for token in piece] + self.film[self.row[item_id]]


def encode_corpus(tokenizer, tables: PromptTables,
                  corpus: list[templates.CopyExample]) -> list[tuple[list[int], int]]:
    """(token ids: prompt, copy template, EOS; prompt length) per example."""
    targets = tokenizer([example.template for example in corpus], add_special_tokens=False)
    encoded = []
    for example, target in zip(corpus, targets["input_ids"]):
        prompt = tables.prompt(example.item_id, example.liked)
        encoded.append((prompt + target + [tables.eos_id], len(prompt)))
    return encoded


def training_dataset(encoded: list[tuple[list[int], int]], batch_size: int, eos_id: int,
                     seed: int | None = None) -> tf.data.Dataset:
    """Batches of similar length, right-padded, reshuffled each epoch when `seed` is given;
    labels are -100 on prompt and padding, so the loss is the copy's alone."""
    dataset = tf.data.Dataset.from_tensor_slices({
        "input_ids": tf.ragged.constant([ids for ids, _ in encoded], tf.int32),
        "labels": tf.ragged.constant([[-100] * n + ids[n:] for ids, n in encoded], tf.int32),
        "attention_mask": tf.ragged.constant([[1] * len(ids) for ids, _ in encoded], tf.int32),
    }).map(lambda example: {key: tf.identity(value) for key, value in example.items()})  # dense rows
    if seed is not None:
        dataset = dataset.shuffle(len(encoded), seed=seed, reshuffle_each_iteration=True)
    # Padded to fixed bucket lengths so that an XLA-compiled train step compiles a few shapes.
    longest = max(len(ids) for ids, _ in encoded)
    boundaries = [b for b in (41, 49, 57, 65, 81, 97, 129) if b <= longest] + [longest + 1]
    return dataset.bucket_by_sequence_length(
        lambda example: tf.shape(example["input_ids"])[0], boundaries,
        [batch_size] * (len(boundaries) + 1), pad_to_bucket_boundary=True,
        padding_values={"input_ids": eos_id, "labels": -100, "attention_mask": 0},
    ).prefetch(tf.data.AUTOTUNE)


# --- Model ---------------------------------------------------------------------------------


def build_model(config: CopywriterConfig, vocab_size: int, eos_id: int):
    """A compact GPT-2 with random weights."""
    import transformers

    gpt2 = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, bos_token_id=eos_id,
        eos_token_id=eos_id)
    model = transformers.TFGPT2LMHeadModel(gpt2)
    model(model.dummy_inputs, training=False)
    return model


def load_gpt2(directory: str | os.PathLike):
    """A local Hugging Face-format GPT-2 directory (`gpt2`, `distilgpt2`, a fine-tuned one) as
    `TFGPT2LMHeadModel`: `tf_model.h5`, or `model.safetensors` in TF or PyTorch layout (which
    `from_pretrained` cannot read in transformers 4.57, STACK.md). A missing weight is an error."""
    import safetensors
    import safetensors.numpy
    import transformers
    from transformers import modeling_tf_pytorch_utils

    directory = pathlib.Path(directory)
    file = directory / "config.json"
    if not file.is_file():
        raise CopywriterError(f"{file}: not found; expected a Hugging Face-format GPT-2 directory")
    config = transformers.GPT2Config.from_json_file(str(file))
    if config.model_type != "gpt2" or json.loads(file.read_text()).get("model_type") != "gpt2":
        raise CopywriterError(f"{file}: expected model_type \"gpt2\"")
    weights = directory / "model.safetensors"
    if (directory / "tf_model.h5").is_file():
        return transformers.TFGPT2LMHeadModel.from_pretrained(str(directory))
    if not weights.is_file():
        raise CopywriterError(f"{directory}: no tf_model.h5 or model.safetensors (sharded "
                              "checkpoints are not supported)")
    with safetensors.safe_open(str(weights), framework="np") as archive:
        layout = (archive.metadata() or {}).get("format")
    if layout == "tf":
        return transformers.TFGPT2LMHeadModel.from_pretrained(str(directory))
    model = transformers.TFGPT2LMHeadModel(config)
    try:
        modeling_tf_pytorch_utils.load_pytorch_state_dict_in_tf2_model(
            model, safetensors.numpy.load_file(str(weights)), skip_logger_warnings=True)
    except (AttributeError, ValueError) as error:
        raise CopywriterError(f"{weights}: does not match {file}: {error}") from None
    return model


def perplexity(model, encoded: list[tuple[list[int], int]], eos_id: int,
               batch_size: int = 64) -> float:
    """exp(mean negative log-likelihood per copy token, EOS included) under teacher forcing."""
    total, count = 0.0, 0
    for batch in training_dataset(encoded, batch_size, eos_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       training=False).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = tf.cast(labels != -100, tf.float32)
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(labels, 0), logits)
        total += float(tf.reduce_sum(loss * mask))
        count += float(tf.reduce_sum(mask))
    return math.exp(total / max(count, 1.0))


# --- Training ------------------------------------------------------------------------------


def train_copywriter(run_dir: str | os.PathLike, config: CopywriterConfig = CopywriterConfig(),
                     checkpoint: str | os.PathLike | None = None,
                     verbose: int | None = None) -> dict:
    """Builds the corpus from the training rows of the run's split, trains (or fine-tunes
    `checkpoint`) and writes `<run_dir>/copywriter/`; returns the training metrics, also recorded
    in `metrics.json`. The dataset and split are the retrieval run's (`towers.runs.run_data`)."""
    run = pathlib.Path(run_dir)
    dataset, split = runs.run_data(run)
    started = time.perf_counter()
    corpus = templates.build_corpus(dataset, split.train, config.corpus_size, config.seed)
    held = max(1, int(len(corpus) * config.heldout_fraction))
    heldout, corpus = corpus[:held], corpus[held:]
    items = templates.catalog(dataset)
    if checkpoint is None:
        texts = ["".join(templates.prompt_pieces(items[e.item_id], [items[i] for i in e.liked]))
                 + e.template for e in corpus]
        tokenizer = train_tokenizer(texts, config.vocab_size)
    else:
        tokenizer = load_tokenizer(checkpoint)
    tables = PromptTables.build(tokenizer, items)
    encoded = encode_corpus(tokenizer, tables, corpus)
    corpus_seconds = time.perf_counter() - started

    keras.utils.set_random_seed(config.seed)
    model = (load_gpt2(checkpoint) if checkpoint is not None
             else build_model(config, len(tokenizer), tokenizer.eos_token_id))
    if len(tokenizer) > model.config.vocab_size:  # slot tokens added to a checkpoint's tokenizer
        model.resize_token_embeddings(len(tokenizer))
    served = tables.longest_prompt()
    longest = max(max(len(ids) for ids, _ in encoded), served + config.max_new_tokens)
    if longest > model.config.n_positions:
        raise CopywriterError(f"corpus lines and served prompts plus max_new_tokens take up to "
                              f"{longest} tokens, the model {model.config.n_positions}; raise "
                              "n_positions or the vocabulary size")
    dataset = training_dataset(encoded, config.batch_size, tokenizer.eos_token_id, config.seed)
    per_epoch = sum(1 for _ in dataset)
    # Known steps per epoch: the progress bar and log line can say how far along and how long left.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(per_epoch))
    steps = config.epochs * per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps - config.warmup_steps, 1), alpha=0.1,
        warmup_target=config.learning_rate, warmup_steps=config.warmup_steps)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
                  jit_compile=config.jit_compile)
    if verbose is None:  # a progress bar on a terminal; in logs, a line a minute and per epoch
        verbose = 1 if sys.stdout.isatty() else 2
    started = time.perf_counter()
    history = model.fit(dataset, epochs=config.epochs, verbose=verbose,
                        callbacks=[towers_train.ProgressLog()] if verbose == 2 else None)
    seconds = time.perf_counter() - started

    heldout_ppl = perplexity(model, encode_corpus(tokenizer, tables, heldout),
                             tokenizer.eos_token_id)
    result = {"seconds": round(seconds, 1), "corpus_seconds": round(corpus_seconds, 1),
              "epochs": config.epochs, "steps": steps, "examples": len(corpus),
              "parameters": int(model.count_params()), "loss": [float(v) for v in history.history["loss"]],
              "heldout_perplexity": round(heldout_ppl, 3), "checkpoint": str(checkpoint) if checkpoint else None}
    # The data and split are the run's (retrieval_config.json), so the record holds neither.
    record = {"checkpoint": str(pathlib.Path(checkpoint).resolve()) if checkpoint else None,
              **dataclasses.asdict(config)}
    _write_run(run, model, tokenizer, heldout, record)
    runs.update_metrics(run, {"training": result}, SUBDIR)
    log.info("copywriter: %d parameters, %.0f s, held-out perplexity %.3f",
             result["parameters"], seconds, heldout_ppl)
    return result


# --- The run directory ---------------------------------------------------------------------


def _write_run(run: pathlib.Path, model, tokenizer, heldout, record: dict) -> None:
    """Writes `<run>/copywriter/` through a staging folder and a rename."""
    import tempfile

    target = run / SUBDIR
    run.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{SUBDIR}-", dir=run) as staging:
        stage = pathlib.Path(staging) / SUBDIR
        model.save_pretrained(str(stage / MODEL_DIR))
        tokenizer.save_pretrained(str(stage / MODEL_DIR))
        (stage / CONFIG_FILE).write_text(json.dumps(record, indent=2))
        (stage / HELDOUT_FILE).write_text("".join(
            json.dumps(dataclasses.asdict(example)) + "\n" for example in heldout))
        if target.exists():
            os.replace(target, pathlib.Path(staging) / "old")
        os.replace(stage, target)


def load_run(run_dir: str | os.PathLike):
    """(config record, model, tokenizer, dataset, split) of a trained copywriter run; the dataset
    and split are the retrieval run's (`towers.runs.run_data`)."""
    record, model, tokenizer = load_model(run_dir)
    return (record, model, tokenizer, *runs.run_data(run_dir))


def load_model(run_dir: str | os.PathLike):
    """(config record, model, tokenizer) of a trained copywriter run, without its data."""
    folder = pathlib.Path(run_dir) / SUBDIR
    if not (folder / CONFIG_FILE).is_file():
        raise CopywriterError(f"{folder / CONFIG_FILE}: not found; train first with "
                              f"`cascade train copywriter --run {run_dir}`")
    record = json.loads((folder / CONFIG_FILE).read_text())
    return record, load_gpt2(folder / MODEL_DIR), load_tokenizer(folder / MODEL_DIR)


def config_of(record: dict) -> CopywriterConfig:
    names = {field.name for field in dataclasses.fields(CopywriterConfig)}
    return CopywriterConfig(**{key: value for key, value in record.items() if key in names})
