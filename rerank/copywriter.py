"""The GPT-2 copywriter (stage three): one grounded line of recommendation copy per final item.

Read top to bottom: the config; the tokenizer (a byte-level BPE trained on the copy corpus, or
the checkpoint's own); the prompt tables that turn (user, item) into token ids; the model (a
compact GPT-2 from scratch, or any local Hugging Face-format GPT-2 directory, fine-tuned);
training with Keras `fit`; the decoder, a KV-cached sampling loop in plain TF ops over the
trained weights, with the in-graph grounding check. The corpus is `copy_corpus`. Elsewhere: the
served graph is `copywriter_export`, its evaluation `copywriter_eval` (`evaluate_copywriter`,
`format_report`), its versioned TF Serving export `serving.export.export_copywriter`; this
module imports none of them.

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

from rerank import copy_corpus
from rerank.config import CopywriterConfig
from towers import data
from towers import train as towers_train

log = logging.getLogger(__name__)

SUBDIR = "copywriter"
CONFIG_FILE = "config.json"
MODEL_DIR = "model"
HELDOUT_FILE = "heldout.jsonl"
METRICS_FILE = towers_train.METRICS_FILE
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
                            special_tokens=[EOS, *copy_corpus.SLOTS], show_progress=False)
    return transformers.GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS,
        pad_token=EOS, additional_special_tokens=list(copy_corpus.SLOTS))


def load_tokenizer(directory: str | os.PathLike):
    import transformers

    directory = pathlib.Path(directory)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise CopywriterError(f"{directory}: no tokenizer (tokenizer.json or vocab.json + "
                              "merges.txt); a GPT-2 checkpoint needs the tokenizer it was trained with")
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(str(directory))
    if tokenizer.eos_token_id is None:
        raise CopywriterError(f"{directory}: the tokenizer has no end-of-text token")
    missing = [slot for slot in copy_corpus.SLOTS if slot not in tokenizer.get_vocab()]
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
    slot_ids: list[int]  # token ids of copy_corpus.SLOTS
    row: dict[str, int]  # item ID -> index into the lists above

    @classmethod
    def build(cls, tokenizer, items: dict[str, data.ItemFacts]) -> PromptTables:
        """From the catalog's facts by ID (`copy_corpus.catalog`)."""
        def encode(texts):
            return tokenizer(texts, add_special_tokens=False)["input_ids"]
        values = list(items.values())
        return cls(list(items), [tokenizer.eos_token_id, *encode([copy_corpus.PROMPT_HEAD])[0]],
                   [encode([copy_corpus.liked_piece(item, position) for item in values])
                    for position in range(copy_corpus.MAX_LIKED)],
                   encode([copy_corpus.film_piece(item) for item in values]),
                   tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(list(copy_corpus.SLOTS)),
                   {item: row for row, item in enumerate(items)})

    def longest_prompt(self, liked: dict[str, tuple[str, ...]]) -> int:
        """An upper bound on the length of any prompt served with the users' `liked` items."""
        pieces = max((sum(sorted(len(self.liked[0][self.row[item]]) for item in items)
                          [-copy_corpus.MAX_LIKED:]) for items in liked.values()), default=0)
        return len(self.head) + pieces + max(map(len, self.film))

    def prompt(self, item_id: str, liked) -> list[int]:
        pieces = [self.liked[position][self.row[other]] for position, other in enumerate(liked)]
        return self.head + [token for piece in pieces for token in piece] + self.film[self.row[item_id]]


def encode_corpus(tokenizer, tables: PromptTables,
                  corpus: list[copy_corpus.CopyExample]) -> list[tuple[list[int], int]]:
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
    in `metrics.json`. The dataset and split are the retrieval run's (`towers.train.run_data`)."""
    run = pathlib.Path(run_dir)
    dataset, split = towers_train.run_data(run)
    started = time.perf_counter()
    corpus = copy_corpus.build_corpus(dataset, split.train, config.corpus_size, config.seed)
    held = max(1, int(len(corpus) * config.heldout_fraction))
    heldout, corpus = corpus[:held], corpus[held:]
    items = copy_corpus.catalog(dataset)
    if checkpoint is None:
        texts = ["".join(copy_corpus.prompt_pieces(items[e.item_id], [items[i] for i in e.liked]))
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
    served = tables.longest_prompt(
        copy_corpus.top_items(split.train, copy_corpus.MAX_LIKED + 1, dataset.implicit))
    longest = max(max(len(ids) for ids, _ in encoded), served + config.max_new_tokens)
    if longest > model.config.n_positions:
        raise CopywriterError(f"corpus lines and served prompts plus max_new_tokens take up to "
                              f"{longest} tokens, the model {model.config.n_positions}; raise "
                              "n_positions or the vocabulary size")
    dataset = training_dataset(encoded, config.batch_size, tokenizer.eos_token_id, config.seed)
    steps = config.epochs * sum(1 for _ in dataset)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, max(steps - config.warmup_steps, 1), alpha=0.1,
        warmup_target=config.learning_rate, warmup_steps=config.warmup_steps)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
                  jit_compile=config.jit_compile)
    if verbose is None:  # a progress bar on a terminal, one line per epoch in logs
        verbose = 1 if sys.stdout.isatty() else 2
    started = time.perf_counter()
    history = model.fit(dataset, epochs=config.epochs, verbose=verbose)
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
    towers_train.update_metrics(run, {"training": result}, SUBDIR)
    log.info("copywriter: %d parameters, %.0f s, held-out perplexity %.3f",
             result["parameters"], seconds, heldout_ppl)
    return result


# --- Decoding ------------------------------------------------------------------------------


class Decoder(tf.Module):
    """Sampling from GPT-2 weights in plain TF ops: one forward pass over the left-padded prompts
    fills a key/value cache, then a `tf.while_loop` feeds one token per step, attending to the
    cache, until every row has written EOS or `max_new_tokens` is reached.

    Why not `TFGPT2LMHeadModel.generate` or the model's own call with `past_key_values`: without
    XLA (stock TF Serving) their per-step graphs cost 3-4 ms for 2 layers x 128 on 2 cores; this
    one, with far fewer ops, about 1 ms, which is what fits 10 lines in 150 ms. The weights are
    copied into plain variables, so the SavedModel needs neither Keras nor transformers.
    Sampling: repetition penalty on the tokens generated so far (never on the prompt, whose
    titles the copy must repeat), temperature, top-k, then top-p within the top k.
    """

    def __init__(self, model, config: CopywriterConfig, eos_id: int):
        super().__init__()
        gpt2 = model.config
        if gpt2.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise CopywriterError(f"activation {gpt2.activation_function!r} is not supported")
        if gpt2.scale_attn_by_inverse_layer_idx or not gpt2.scale_attn_weights:
            raise CopywriterError("only GPT-2's default attention scaling is supported")
        self.heads, self.epsilon, self.eos_id = gpt2.n_head, gpt2.layer_norm_epsilon, eos_id
        self.exact_gelu = gpt2.activation_function == "gelu"
        self.max_positions = gpt2.n_positions
        self.config = config
        transformer = model.transformer

        def copy(weight):
            return tf.Variable(weight.numpy(), trainable=False)
        self.wte, self.wpe = copy(transformer.wte.embeddings), copy(transformer.wpe.embeddings)
        self.blocks = [{name: copy(weight) for name, weight in {
            "ln_1_g": block.ln_1.gamma, "ln_1_b": block.ln_1.beta,
            "attn_w": block.attn.c_attn.weight, "attn_b": block.attn.c_attn.bias,
            "proj_w": block.attn.c_proj.weight, "proj_b": block.attn.c_proj.bias,
            "ln_2_g": block.ln_2.gamma, "ln_2_b": block.ln_2.beta,
            "fc_w": block.mlp.c_fc.weight, "fc_b": block.mlp.c_fc.bias,
            "mlp_w": block.mlp.c_proj.weight, "mlp_b": block.mlp.c_proj.bias}.items()}
            for block in transformer.h]
        self.ln_f = (copy(transformer.ln_f.gamma), copy(transformer.ln_f.beta))

    def _norm(self, x, gamma, beta):
        mean, variance = tf.nn.moments(x, [-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + self.epsilon) * gamma + beta

    def _gelu(self, x):
        if self.exact_gelu:
            return tf.nn.gelu(x, approximate=False)
        return 0.5 * x * (1.0 + tf.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))

    def _forward(self, x, caches, bias):
        """x [R, T, D]; caches [(k, v) [R, H, S, D/H]] per layer; bias [R, 1, T, S+T] (0 or
        -1e9) -> last hidden state [R, T, D] after ln_f, and the caches extended by T."""
        rows, length, width = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
        size = width // self.heads
        extended = []
        for block, (past_k, past_v) in zip(self.blocks, caches):
            h = self._norm(x, block["ln_1_g"], block["ln_1_b"])
            qkv = tf.matmul(h, block["attn_w"]) + block["attn_b"]  # [R, T, 3D]
            qkv = tf.transpose(tf.reshape(qkv, [rows, length, 3, self.heads, size]), [2, 0, 3, 1, 4])
            k = tf.concat([past_k, qkv[1]], axis=2)  # [R, H, S+T, D/H]
            v = tf.concat([past_v, qkv[2]], axis=2)
            extended.append((k, v))
            scores = tf.matmul(qkv[0], k, transpose_b=True) * (1.0 / math.sqrt(size)) + bias
            y = tf.matmul(tf.nn.softmax(scores), v)  # [R, H, T, D/H]
            y = tf.reshape(tf.transpose(y, [0, 2, 1, 3]), [rows, length, width])
            x = x + tf.matmul(y, block["proj_w"]) + block["proj_b"]
            h = self._norm(x, block["ln_2_g"], block["ln_2_b"])
            h = self._gelu(tf.matmul(h, block["fc_w"]) + block["fc_b"])
            x = x + tf.matmul(h, block["mlp_w"]) + block["mlp_b"]
        return self._norm(x, *self.ln_f), extended

    def prompt_logits(self, ids, mask):
        """Next-token logits [R, V] after left-padded prompts ids/mask [R, P], and the caches."""
        rows, length = tf.shape(ids)[0], tf.shape(ids)[1]
        positions = tf.maximum(tf.cumsum(mask, axis=1) - 1, 0)  # left padding: first token at 0
        x = tf.gather(self.wte, ids) + tf.gather(self.wpe, positions)
        causal = tf.linalg.band_part(tf.ones([length, length]), -1, 0)
        allowed = causal[None, None] * tf.cast(mask, tf.float32)[:, None, None, :]
        size = self.wte.shape[-1] // self.heads
        empty = tf.zeros([rows, self.heads, 0, size])
        x, caches = self._forward(x, [(empty, empty)] * len(self.blocks), (1.0 - allowed) * -1e9)
        return tf.matmul(x[:, -1], self.wte, transpose_b=True), caches, positions[:, -1]

    def sample(self, logits, generated, seed):
        """One token per row [R] from logits [R, V]; `generated` [R, V] marks tokens written."""
        config = self.config
        penalized = tf.where(logits > 0, logits / config.repetition_penalty,
                             logits * config.repetition_penalty)
        logits = tf.where(generated > 0, penalized, logits) / config.temperature
        top, indices = tf.math.top_k(logits, k=min(config.top_k, int(self.wte.shape[0])))
        before = tf.cumsum(tf.nn.softmax(top), axis=-1, exclusive=True)
        top = tf.where(before < config.top_p, top, -1e9)  # the most likely token always stays
        choice = tf.random.stateless_categorical(top, 1, seed=seed, dtype=tf.int32)
        return tf.gather(indices, choice[:, 0], batch_dims=1)

    def generate(self, ids, mask, seed):
        """ids, mask int32 [R, P] (prompts padded on the left), seed int64 scalar ->
        (tokens int32 [R, T<=max_new_tokens], EOS after the end; finished bool [R])."""
        config, eos = self.config, self.eos_id
        rows, prompt_length = tf.shape(ids)[0], tf.shape(ids)[1]
        tf.debugging.assert_less_equal(
            prompt_length + config.max_new_tokens, self.max_positions,
            message="prompt plus max_new_tokens exceeds the model's n_positions")
        logits, caches, position = self.prompt_logits(ids, mask)
        key_bias = (1.0 - tf.cast(mask, tf.float32)) * -1e9  # [R, S]
        vocab = tf.shape(self.wte)[0]
        generated = tf.zeros([rows, vocab])
        tokens = tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])
        finished = tf.zeros([rows], tf.bool)
        flat = [tensor for pair in caches for tensor in pair]

        def step(i, logits, generated, finished, position, key_bias, tokens, *flat):
            token = self.sample(logits, generated, tf.stack([seed, tf.cast(i, tf.int64)]))
            token = tf.where(finished, eos, token)
            tokens = tokens.write(i, token)
            finished = finished | (token == eos)
            generated = tf.maximum(generated, tf.one_hot(token, vocab))
            position = position + 1
            key_bias = tf.concat([key_bias, tf.zeros([rows, 1])], axis=1)
            x = (tf.gather(self.wte, token) + tf.gather(self.wpe, position))[:, None]
            pairs = list(zip(flat[0::2], flat[1::2]))
            x, pairs = self._forward(x, pairs, key_bias[:, None, None, :])
            logits = tf.matmul(x[:, -1], self.wte, transpose_b=True)
            return (i + 1, logits, generated, finished, position, key_bias, tokens,
                    *[tensor for pair in pairs for tensor in pair])

        cache_shape = tf.TensorShape([None, self.heads, None, self.wte.shape[-1] // self.heads])
        out = tf.while_loop(
            lambda i, logits, generated, finished, *_: (
                (i < config.max_new_tokens) & ~tf.reduce_all(finished)),
            step, (0, logits, generated, finished, position, key_bias, tokens, *flat),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, None]),
                              tf.TensorShape([None, None]), tf.TensorShape([None]),
                              tf.TensorShape([None]), tf.TensorShape([None, None]), None,
                              *[cache_shape] * len(flat)))
        count, finished, tokens = out[0], out[3], out[6]
        tokens = tf.reshape(tf.transpose(tokens.stack()), [rows, count])  # [R, T]
        return tokens, finished


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
    and split are the retrieval run's (`towers.train.run_data`)."""
    folder = pathlib.Path(run_dir) / SUBDIR
    if not (folder / CONFIG_FILE).is_file():
        raise CopywriterError(f"{folder / CONFIG_FILE}: not found; train first with "
                              f"`cascade train copywriter --run {run_dir}`")
    record = json.loads((folder / CONFIG_FILE).read_text())
    dataset, split = towers_train.run_data(run_dir)
    return (record, load_gpt2(folder / MODEL_DIR), load_tokenizer(folder / MODEL_DIR),
            dataset, split)


def config_of(record: dict) -> CopywriterConfig:
    names = {field.name for field in dataclasses.fields(CopywriterConfig)}
    return CopywriterConfig(**{key: value for key, value in record.items() if key in names})
