"""Writes the four notebooks of this folder from the cells below, with no outputs.

The notebooks are generated so that their code is reviewable as plain Python and their JSON stays
free of outputs in git. Edit the cells here, then run `.venv/bin/python notebooks/build.py`.
`tests/e2e/test_notebooks.py` checks that the committed notebooks are what this script writes.
"""

from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

SETUP = '''\
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # TFRS needs Keras 2 (tf_keras)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import matplotlib.pyplot as plt
import tensorflow as tf
import tf_keras as keras
from IPython.display import Markdown, display

from towers import data, fetch, model, retrieval_eval, runs, train

REPO = pathlib.Path.cwd().resolve()
if not (REPO / "setup.cfg").exists():  # started from notebooks/
    REPO = REPO.parent
# CASCADE_NOTEBOOK_SMALL=1: a 3,000-rating slice and tiny models, for CI (seconds, not minutes).
SMALL = os.environ.get("CASCADE_NOTEBOOK_SMALL") == "1"
DATA = pathlib.Path(os.environ.get("CASCADE_DATA", REPO / "data" / "ml-100k"))
if not all((DATA / f"ml-100k.{suffix}").exists() for suffix in ("inter", "yaml")):
    fetch.fetch_movielens_100k(DATA)  # RecBole's copy from its wheel, SHA-256 verified, + the card
WORK = pathlib.Path(tempfile.mkdtemp(prefix="cascade-notebook-"))  # scratch, removed at the end


def small_data(rows: int = 3_000) -> pathlib.Path:
    """The first `rows` ratings of MovieLens-100K, with the whole catalog, every user, the card."""
    folder = WORK / "ml-100k-small"
    folder.mkdir(exist_ok=True)
    lines = (DATA / "ml-100k.inter").read_text().splitlines(keepends=True)
    (folder / "ml-100k.inter").write_text("".join(lines[:rows + 1]))  # + the header line
    for suffix in ("item", "user", "yaml"):
        shutil.copy(DATA / f"ml-100k.{suffix}", folder)
    return folder


TINY_RETRIEVAL = model.RetrievalConfig(embedding_dim=16, id_dim=16, side_dim=4, hidden=32,
                                       history_length=32, epochs=3, batch_size=128,
                                       learning_rate=1e-2)
DATA_USED = small_data() if SMALL else DATA
print(f"data: {DATA_USED} ({'small' if SMALL else 'full'} configuration)")'''

DEMO_RUN = '''\
# The demo run (`make demo`) when it exists; otherwise train one like it, here or in scratch.
def retrieval_run() -> pathlib.Path:
    if SMALL:
        run = WORK / "run"
        if not (run / runs.WEIGHTS).with_suffix(".index").exists():
            train.train(DATA_USED, run, TINY_RETRIEVAL, verbose=0)
        return run
    run = REPO / "runs" / "ml100k"
    if not (run / "checkpoints" / "final.index").exists():
        print("no demo run: training one (about a minute on 2 cores)")
        train.train(DATA_USED, run, verbose=2)
    return run'''

CLEANUP = '''\
shutil.rmtree(WORK, ignore_errors=True)'''


def retrieval_notebook() -> list:
    md, code = v4.new_markdown_cell, v4.new_code_cell
    return [
        md("# 01 · Retrieval: the two-tower model with Keras `fit`\n\n"
           "Stage one of Cascade (`towers/`): a query tower (user ID, recent history and the "
           "user features the dataset's card declares; for MovieLens: age, gender, occupation) "
           "and a candidate tower (item ID and the card's item features; for MovieLens: title "
           "words, release year, genres), trained with "
           "in-batch softmax (`tfrs.tasks.Retrieval`). This notebook trains one from scratch with "
           "plain `model.fit`, plots its curves, compares it with popularity, ALS and EASE on the "
           "benchmark split, and looks at which films end up next to each other.\n\n"
           "Set `CASCADE_NOTEBOOK_SMALL=1` for the small configuration CI runs."),
        code(SETUP),
        md("## Data and the benchmark split\n\nMovieLens-100K in RecBole's atomic files, split "
           "by the card's default protocol, `random`: the TFRS tutorial split (seeded shuffle, "
           "80,000 train / 20,000 test). The last training rows are held out as a validation set "
           "for the curves; the test split is only read at the end."),
        code('''\
dataset = data.load(DATA_USED)
split = dataset.split()  # the card's default protocol
labels = dict(zip(dataset.item_ids(), dataset.labels(dataset.item_ids())))
holdout = 200 if SMALL else 8_000
fit_rows = split.train.take(np.arange(len(split.train) - holdout))
validation = split.train.take(np.arange(len(split.train) - holdout, len(split.train)))
print(f"{len(dataset.user_ids())} users, {len(dataset.item_ids())} items; "
      f"{len(fit_rows)} training, {len(validation)} validation, {len(split.test)} test ratings "
      f"({split.protocol} split)")
for user, item, rating in list(zip(fit_rows.user_id, fit_rows.item_id, fit_rows.rating))[:5]:
    print(f"user {user:>4} rated {rating:g} stars: {labels[item]}")'''),
        md("## The data layer: a card, and the features it declares\n\n`data.load` reads a "
           "folder of RecBole atomic files (`.inter`, optional `.item` and `.user`) and its "
           "card, `<name>.yaml`, which says what the fields mean: the features each tower "
           "builds, the text the language stages read, the default split. No stage names a "
           "MovieLens field; any RecBole-format folder works, with or without a card "
           "(docs/data.md). `features.build_tables` turns the card's features and the training "
           "rows into lookup tables: (key, kind, size) per tower input."),
        code('''\
from towers import features

print(dataset.card.source.read_text() if dataset.card.source else "no card (docs/data.md)")
config = TINY_RETRIEVAL if SMALL else model.RetrievalConfig()
tables = features.build_tables(dataset, fit_rows, config.history_length)
print([(s.key, s.kind, s.size) for s in tables.specs])'''),
        md("## The model\n\nThe tables (vocabularies, each user's history, the side features "
           "above) go into `model.RetrievalModel`, a `tfrs.Model` whose `compute_loss` is the "
           "retrieval task. Everything else is Keras."),
        code('''\
keras.utils.set_random_seed(config.seed)
retrieval = model.RetrievalModel(tables, config)
retrieval.compile(optimizer=model.optimizer(config))
history = retrieval.fit(
    train.training_dataset(fit_rows, config, tables),
    epochs=config.epochs,
    callbacks=[train.ValidationMetrics(tables, validation)],  # adds val_hit_rate@10/@100
    verbose=2,
)'''),
        md("## Training curves"),
        code('''\
epochs = np.arange(1, len(history.history["loss"]) + 1)
figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
left.plot(epochs, history.history["loss"], "o-")
left.set(title="training loss (last batch of each epoch)", xlabel="epoch")
for name in ("val_hit_rate@10", "val_hit_rate@100"):
    right.plot(epochs, history.history[name], "o-", label=name)
right.set(title="validation hit rate", xlabel="epoch")
right.legend()
plt.show()'''),
        md("## Hit rate vs peers on the test split\n\nThe evaluation protocol: for each test "
           "interaction, is the item in the user's top K, with the user's training items left "
           "out? Popularity and implicit ALS are scored by the same code. (This model did not "
           "train on the validation rows, so its numbers sit a little below the demo run's.)"),
        code('''\
from towers import metrics, peers

queries, candidates = model.embeddings(retrieval, tables)
users, items, seen = retrieval_eval.test_rows(tables, split.test)  # test pairs as table rows + seen mask
table = {
    "two-tower (this notebook)": metrics.evaluate(metrics.embedding_scores(queries, candidates),
                                                  users, items, seen),
    "popularity": metrics.evaluate(peers.popularity_scores(seen), users, items, seen),
    "ALS (implicit, 64 factors)": metrics.evaluate(peers.als_scores(seen), users, items, seen),
    "EASE (l2 500)": metrics.evaluate(peers.ease_scores(seen), users, items, seen),
}
demo_metrics = REPO / "runs" / "ml100k" / "metrics.json"
if not SMALL and demo_metrics.exists():  # the demo run, trained on every training row
    import json
    table["demo run (`cascade train retrieval`)"] = json.loads(
        demo_metrics.read_text())["test"]["cascade_retrieval"]
display(Markdown(retrieval_eval.format_table(table)))'''),
        md("## Embedding neighbours\n\nThe candidate tower's embeddings are L2-normalized, so "
           "the dot product is the cosine. Films close to a few well-known ones:"),
        code('''\
normalized = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
row_of = {item_id: row for row, item_id in enumerate(tables.item_ids)}
for item_id in ("1", "50", "100", "181"):  # Toy Story, Star Wars, Fargo, Return of the Jedi
    similarity = normalized @ normalized[row_of[item_id]]
    nearest = [r for r in np.argsort(-similarity) if tables.item_ids[r] != item_id][:5]
    print(labels[item_id])
    for r in nearest:
        print(f"    {similarity[r]:.3f}  {labels[tables.item_ids[r]]}")'''),
        code(CLEANUP),
    ]


def rerank_notebook() -> list:
    md, code = v4.new_markdown_cell, v4.new_code_cell
    return [
        md("# 02 · Re-ranking one user's candidates\n\n"
           "Stage two (`rerank/cross_encoder.py`): a BERT cross-encoder reads (user context, "
           "candidate) text pairs for the retrieval top K. The final score is\n\n"
           "    cross-encoder logit + w_r · retrieval logit + w_p · log(1 + training count)"
           " + w_e · EASE score\n\n"
           "with w_r, w_p and w_e learned (EASE: the item-item peer of `towers/peers.py`), so "
           "every move can be split into the four terms. This "
           "notebook re-ranks one user's candidates and shows what moved and why.\n\n"
           "Full configuration: the demo run's re-ranker (`make demo`; trained here if missing, "
           "which takes a while). Small configuration: a tiny random BERT, trained for one epoch."),
        code(SETUP),
        code(DEMO_RUN),
        code('''\
from rerank import cross_encoder

RUN = retrieval_run()
if SMALL:  # a tiny random BERT whose WordPieces are characters, as the tests use
    import string
    import transformers

    bert_dir = WORK / "tiny-bert"
    keras.utils.set_random_seed(0)
    bert = transformers.TFBertModel(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=64, type_vocab_size=2))
    bert(bert.dummy_inputs)
    bert.save_pretrained(str(bert_dir))
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
             + ["##" + c for c in string.ascii_lowercase] + list(string.digits)
             + ["##" + c for c in string.digits] + list(".,:;()'!?-&"))
    (bert_dir / "vocab.txt").write_text("\\n".join(vocab) + "\\n")
    cross_encoder.train_reranker(RUN, checkpoint=bert_dir, verbose=0, config=cross_encoder.RerankerConfig(
        max_length=32, history_titles=2, layers=1, candidates=12, group_size=4, holdout=400,
        validation_users=8, epochs=1, batch_groups=4, learning_rate=1e-3))
elif not (RUN / cross_encoder.RERANKER_DIR / cross_encoder.CONFIG_FILE).exists():
    print("the demo run has no re-ranker: training it (`cascade train reranker`), many minutes")
    cross_encoder.train_reranker(RUN, verbose=2)
reranker = cross_encoder.load_reranker(RUN)
retrieval, tables = runs.load_run(RUN)
print(", ".join(f"{name} = {value:.3f}"
                for name, value in cross_encoder.head_weights(reranker.encoder).items()))'''),
        md("## One user's retrieval candidates\n\nThe run's retrieval model ranks the catalog "
           "for the user (their training items left out); its top K are the candidates. "
           "Items the user rated in the test split are marked ✓."),
        code('''\
from towers import features

dataset, split = runs.run_data(RUN)  # the dataset and split the run was trained on
labels = dict(zip(dataset.item_ids(), dataset.labels(dataset.item_ids())))
K = 20 if SMALL else 100
test_items = {}
for user, item in zip(split.test.user_id, split.test.item_id):
    test_items.setdefault(user, set()).add(item)
user = "42" if "42" in test_items else sorted(test_items, key=lambda u: -len(test_items[u]))[0]

_, candidates = model.embeddings(retrieval, tables)
query = retrieval.query_tower(tf.constant([user])).numpy()[0]
logits = candidates @ query / retrieval.config.temperature  # what the re-ranker was trained on
user_row = list(tables.user_ids).index(user)
seen = set(tables.seen_of(user_row))
order = [r for r in np.argsort(-logits, kind="stable") if tables.item_ids[r] not in seen][:K]
item_ids = [str(tables.item_ids[r]) for r in order]
context = reranker.texts.context.lookup(tf.constant([user])).numpy()[0].decode()
print(f"user {user}: {context}")'''),
        md("## Re-rank, and split every score into its four terms"),
        code('''\
ranked = reranker.rank(user, item_ids, [float(logits[r]) for r in order])
final = dict(ranked)
weights = cross_encoder.head_weights(reranker.encoder)
popularity = reranker.texts.popularity.lookup(tf.constant(item_ids)).numpy()
ease = reranker.texts.ease_score(tf.constant([user] * len(item_ids)), tf.constant(item_ids)).numpy()
rows = []
for before, (item_id, r) in enumerate(zip(item_ids, order)):
    terms = dict(retrieval=weights["retrieval_weight"] * float(logits[r]),
                 popularity=weights["popularity_weight"] * float(popularity[before]),
                 ease=weights["ease_weight"] * float(ease[before]))
    rows.append(dict(item_id=item_id, before=before + 1,
                     bert=final[item_id] - sum(terms.values()), **terms))
after = {item_id: rank + 1 for rank, (item_id, _) in enumerate(ranked)}
mean = {key: np.mean([row[key] for row in rows])
        for key in ("bert", "retrieval", "popularity", "ease")}


def why(row) -> str:
    """The term that sets this item furthest from the average candidate, in the direction it moved."""
    moved = row["before"] - after[row["item_id"]]
    deviation = {key: row[key] - mean[key] for key in mean}
    key = max(deviation, key=lambda k: deviation[k] * (1 if moved >= 0 else -1))
    return f"{key} {deviation[key]:+.3f}"


lines = ["| after | before | moved | film | test | BERT | w_r·retrieval | w_p·popularity "
         "| w_e·EASE | why |", "|---|---|---|---|---|---|---|---|---|---|"]
for row in sorted(rows, key=lambda row: after[row["item_id"]])[:15]:
    moved = row["before"] - after[row["item_id"]]
    lines.append(
        f"| {after[row['item_id']]} | {row['before']} | {moved:+d} | "
        f"{labels[row['item_id']]} | "
        f"{'✓' if row['item_id'] in test_items[user] else ''} | {row['bert']:.3f} | "
        f"{row['retrieval']:.3f} | {row['popularity']:.3f} | {row['ease']:.3f} | {why(row)} |")
display(Markdown("\\n".join(lines)))'''),
        md("`why` names the term in which the film differs most from the average candidate, in "
           "the direction it moved: `bert` means the cross-encoder read something in the pair "
           "(the user's recent titles and genres against the film's) that retrieval's dot "
           "product did not."),
        code('''\
figure, axis = plt.subplots(figsize=(5, 7))
for row in rows:
    hit = row["item_id"] in test_items[user]
    axis.plot([0, 1], [row["before"], after[row["item_id"]]], "o-",
              color="tab:green" if hit else "tab:gray", alpha=0.9 if hit else 0.3,
              linewidth=2 if hit else 1)
axis.set_xticks([0, 1], ["retrieval", "re-ranked"])
axis.set_ylim(K + 1, 0)
axis.set_ylabel("rank")
axis.set_title(f"user {user}: candidates before and after (green: test items)")
plt.show()
hits = lambda ranks: sum(1 for item_id in item_ids if item_id in test_items[user]
                         and ranks[item_id] <= 10)
print(f"test items in the top 10: retrieval {hits({i: n + 1 for n, i in enumerate(item_ids)})}, "
      f"re-ranked {hits(after)}")'''),
        code(CLEANUP),
    ]


def copy_notebook() -> list:
    md, code = v4.new_markdown_cell, v4.new_code_cell
    return [
        md("# 03 · Copy: grounded lines from the GPT-2 copywriter\n\n"
           "Stage three (`rerank/copy/copywriter.py`): a compact GPT-2 writes one line of copy per "
           "final item from a prompt of facts (the film's title, year and genres, and films the "
           "user rated highly). Titles are slot tokens the graph fills in, and a grounding check "
           "in the graph replaces any line that lacks the film's title or names a film the "
           "prompt does not hold.\n\n"
           "Full configuration: the demo run's copywriter (trained here if missing). Small: a "
           "one-layer GPT-2 trained for a few seconds on a tiny retrieval run's data, whose "
           "lines are mostly fallbacks."),
        code(SETUP),
        code(DEMO_RUN),
        code('''\
from rerank.copy import copywriter, evaluation, graph, templates

RUN = retrieval_run()  # the copywriter reads the run's dataset and split
if SMALL:
    copywriter.train_copywriter(RUN, copywriter.CopywriterConfig(
        n_layer=1, n_embd=32, n_head=2, n_positions=320, vocab_size=400, corpus_size=400,
        epochs=3, batch_size=32, learning_rate=1e-2, warmup_steps=2, max_new_tokens=12,
        jit_compile=False), verbose=0)
elif not (RUN / copywriter.SUBDIR / copywriter.CONFIG_FILE).exists():
    print("the demo run has no copywriter: training it (`cascade train copywriter`)")
    copywriter.train_copywriter(RUN, verbose=2)
record, gpt2, tokenizer, dataset, split = copywriter.load_run(RUN)
facts = templates.catalog(dataset)  # item ID -> data.ItemFacts (title, year, categories)
print(f"GPT-2: {gpt2.config.n_layer} layers x {gpt2.config.n_embd}, "
      f"{gpt2.count_params():,} parameters, vocabulary {len(tokenizer)}")'''),
        md("## What it learned from\n\nThe corpus is built from training ratings only: a prompt "
           "of facts and a templated line with slot tokens where titles go."),
        code('''\
for example in templates.build_corpus(dataset, split.train, 4, seed=7):
    print("prompt facts:", facts[example.item_id].label(), "| liked:",
          [facts[i].label() for i in example.liked])
    print("  template:", example.template)
    print("  copy:    ", example.target)'''),
        md("## Generate copy for one user's films\n\n`CopywriterModule` is the exported graph: "
           "`details` returns the served line, the reasons it cites (the user's liked films whose "
           "item-item weight raised the film's score most: the copywriter alone sees no ranking; "
           "the `cascade` cites instead the liked films without which the film would rank lower, "
           "found by occlusion over its re-ranked candidates, `rerank/reasons.py`, and passes "
           "them to `write`), the first sample and what the checks found in it, and which sample "
           "was served (the first of four that passes)."),
        code('''\
module = graph.CopywriterModule.from_run(RUN, (record, gpt2, tokenizer, dataset, split))
by_user = {}
for user, item in zip(split.test.user_id, split.test.item_id):
    by_user.setdefault(user, []).append(item)
user = "42" if "42" in by_user else max(by_user, key=lambda u: len(by_user[u]))
items = by_user[user][:5]
out = module.details(tf.constant([user]), tf.constant([items]))
lines = ["| film | reasons | served copy | first sample | its frame and facts hold | served sample |",
         "|---|---|---|---|---|---|"]
for n, item in enumerate(items):
    served, generated = (out[key].numpy()[0, n].decode() for key in ("copy", "generated"))
    reasons = [facts[r.decode()].label() for r in out["reasons"].numpy()[0, n] if r]
    attempt = int(out["attempt"].numpy()[0, n])  # -1: no sample passed, the factual line
    lines.append(f"| {facts[item].label()} | {'; '.join(reasons) or '-'} | {served} | {generated} | "
                 f"{bool(out['claims_hold'].numpy()[0, n])} | {attempt if attempt >= 0 else 'fallback'} |")
display(Markdown(f"user {user}\\n\\n" + "\\n".join(lines)))'''),
        md("## Grounding statistics\n\n`evaluation.evaluate_copywriter` writes copy for "
           "(user, item) pairs of the test split and checks every line again in Python. It "
           "records its result in the run's `metrics.json`, so it runs here on a scratch folder "
           "that links to the run's copywriter and copies its data config, and the demo run's "
           "recorded numbers stay as "
           "`cascade evaluate copywriter` wrote them."),
        code('''\
scratch = WORK / "evaluation"
scratch.mkdir(exist_ok=True)
if not (scratch / copywriter.SUBDIR).exists():
    (scratch / copywriter.SUBDIR).symlink_to((RUN / copywriter.SUBDIR).resolve())
shutil.copy(RUN / runs.CONFIG_FILE, scratch)  # the run's dataset and split (`runs.run_data`)
result = evaluation.evaluate_copywriter(scratch, pairs=24 if SMALL else 300, examples=5,
                                             timing_calls=2 if SMALL else 10)
display(Markdown(evaluation.format_report(result)))'''),
        code(CLEANUP),
    ]


def serving_notebook() -> list:
    md, code = v4.new_markdown_cell, v4.new_code_cell
    return [
        md("# 04 · Serving: export, `cascade serve`, and the TF Serving client\n\n"
           "The run is exported as SavedModels in the TF Serving model-base-path layout; "
           "`cascade serve` (TF-Serving-compatible) serves them on a free port; the client side "
           "is nothing but the official `tensorflow-serving-api` stubs over gRPC, and plain "
           "HTTP for REST, exactly as against `tensorflow_model_server`.\n\n"
           "Full configuration: the demo run (trained if missing), every stage it has. Small: "
           "a tiny retrieval run."),
        code(SETUP),
        code(DEMO_RUN),
        code('''\
from serving import export

RUN = retrieval_run()
MODELS = WORK / "models"
written = export.export(RUN, MODELS, index_kind="bruteforce", k=20 if SMALL else 100)
for name, path in written.items():
    print(f"{name:16s} {path.relative_to(WORK)}")
print((MODELS / "models.config").read_text())'''),
        md("## Start `cascade serve` on free ports"),
        code('''\
import atexit
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GRPC_PORT, REST_PORT = free_port(), free_port()
server_log = open(WORK / "serve.log", "wb")
server = subprocess.Popen(
    [sys.executable, "-m", "serving.cli", "serve", "--model-base-path", str(MODELS),
     "--port", str(GRPC_PORT), "--rest_api_port", str(REST_PORT)],
    stdout=server_log, stderr=subprocess.STDOUT)
atexit.register(server.kill)  # never leave it behind, even if a later cell fails
print(f"cascade serve: pid {server.pid}, gRPC localhost:{GRPC_PORT}, REST localhost:{REST_PORT}")'''),
        md("## gRPC with the official stubs\n\nWait until `retrieval` is AVAILABLE "
           "(`ModelService.GetModelStatus`), read its signature (`GetModelMetadata`), then "
           "`Predict` for a known user and one the model has never seen (cold start)."),
        code('''\
import time

import grpc
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

channel = grpc.insecure_channel(f"localhost:{GRPC_PORT}")
status_request = get_model_status_pb2.GetModelStatusRequest()
status_request.model_spec.name = "retrieval"
deadline = time.monotonic() + 300
while True:
    try:
        status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            status_request, timeout=5)
        if any(v.state == v.AVAILABLE for v in status.model_version_status):
            break
    except grpc.RpcError as error:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((WORK / "serve.log").read_text()[-2000:]) from error
    time.sleep(0.5)
print(status)

stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
metadata_request = get_model_metadata_pb2.GetModelMetadataRequest()
metadata_request.model_spec.name = "retrieval"
metadata_request.metadata_field.append("signature_def")
metadata = stub.GetModelMetadata(metadata_request, timeout=10)
signatures = get_model_metadata_pb2.SignatureDefMap()
metadata.metadata["signature_def"].Unpack(signatures)
signature = signatures.signature_def["serving_default"]
dtype = tf.dtypes.as_dtype
print("inputs:", {k: dtype(v.dtype).name for k, v in signature.inputs.items()},
      "outputs:", {k: dtype(v.dtype).name for k, v in signature.outputs.items()})'''),
        code('''\
dataset = data.load(DATA_USED)
labels = dict(zip(dataset.item_ids(), dataset.labels(dataset.item_ids())))
users = ["42", "someone-new"]
request = predict_pb2.PredictRequest()
request.model_spec.name = "retrieval"
request.model_spec.signature_name = "serving_default"
request.inputs["user_id"].CopyFrom(tf.make_tensor_proto(users))
response = stub.Predict(request, timeout=30)
grpc_items = tf.make_ndarray(response.outputs["item_ids"])
grpc_scores = tf.make_ndarray(response.outputs["scores"])
print("answered by", response.model_spec.name, "version", response.model_spec.version.value)
for user, ids, scores in zip(users, grpc_items, grpc_scores):
    print(f"user {user}:")
    for item_id, score in list(zip(ids, scores))[:5]:
        print(f"   {score:6.3f}  {labels[item_id.decode()]}")'''),
        md("## REST\n\nThe same call as JSON over HTTP (`/v1/models/<name>:predict`, columnar "
           "`inputs`), and the model status at `/v1/models/<name>`."),
        code('''\
import json
import urllib.request

base = f"http://localhost:{REST_PORT}/v1/models/retrieval"
with urllib.request.urlopen(base, timeout=10) as reply:
    print(json.loads(reply.read()))
body = json.dumps({"inputs": {"user_id": users}}).encode()
request = urllib.request.Request(f"{base}:predict", data=body,
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as reply:
    outputs = json.loads(reply.read())["outputs"]
rest_items = np.array(outputs["item_ids"], dtype=object)
print("REST and gRPC agree:", (rest_items == grpc_items.astype(str)).all()
      and np.allclose(outputs["scores"], grpc_scores, atol=1e-5))'''),
        md("## Stop the server"),
        code('''\
channel.close()
server.terminate()  # SIGTERM: the server drains and exits
print("exit code", server.wait(timeout=60))
server_log.close()
print((WORK / "serve.log").read_text()[-600:])'''),
        code(CLEANUP),
    ]


NOTEBOOKS = {
    "01_retrieval.ipynb": retrieval_notebook,
    "02_rerank.ipynb": rerank_notebook,
    "03_copy.ipynb": copy_notebook,
    "04_serving.ipynb": serving_notebook,
}


def build(name: str) -> nbformat.NotebookNode:
    notebook = v4.new_notebook(cells=NOTEBOOKS[name]())
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    for number, cell in enumerate(notebook.cells):
        cell["id"] = f"{name.split('_')[0]}-{number:02d}"  # stable ids: no diff on rebuild
    return notebook


def main() -> int:
    for name in NOTEBOOKS:
        nbformat.write(build(name), HERE / name)
        print(HERE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
