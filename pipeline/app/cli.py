"""The ``funkflow`` command line (``python -m funkflow`` runs the same).

Exit codes are sysexits (see :mod:`funkflow.pipeline.core.errors`) so that schedulers can act
on them: 0 done, 2 usage, 65 bad data, 70 diverged, 75 cluster trouble, 78 bad config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from funkflow.pipeline.core.config import (
    DUPLICATE_POLICIES,
    FORMATS,
    GenerateConfig,
    config_description,
    load_config,
    shipped_configs,
)
from funkflow.pipeline.core.errors import (
    EXIT_DATAERR,
    EXIT_OK,
    EXIT_SOFTWARE,
    ConfigError,
    FunkflowError,
    UsageError,
    outside_fault,
)
from funkflow.pipeline.core.logs import configure, say
from funkflow.pipeline.core.rundir import new_output, package_version
from funkflow.pipeline.training.plan import BANDWIDTH, HOP_SECONDS, Plan, auto_d, calibrate
from funkflow.tasks.artifacts import ArtifactError

# A verb imports what it runs when it runs (Dask, numba, the stages): `funkflow --help` and the light
# verbs need not wait for the heavy ones' imports.

log = logging.getLogger("funkflow.pipeline.app.cli")

STAGE_VERBS = {
    "run": ("evaluate", "run the whole chain: data, block, train, evaluate"),
    "train": ("train", "run the chain up to training (earlier stages only if out of date)"),
    "evaluate": ("evaluate", "evaluate the trained model (earlier stages only if out of date)"),
    "export": ("export", "write the trained factors with their raw ids as Parquet to RUN_DIR/export/"),
}


BY_SIZE = "default: in this process below 25M ratings, else a LocalCluster"


def _add_cluster_flags(parser: argparse.ArgumentParser, default: str = BY_SIZE) -> None:
    """Where a verb's tasks run: the same two flags, read the same way (cluster.scheduler and
    cluster.scheduler_file), on every verb that computes."""
    parser.add_argument("--scheduler", metavar="ADDR",
                        help=f"Dask scheduler address (tcp://host:8786), local (start a LocalCluster) or inprocess; "
                             f"{default}")
    parser.add_argument("--scheduler-file", metavar="FILE",
                        help="JSON file with the scheduler address, as `dask scheduler --scheduler-file` writes "
                             "(default: none)")


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable; default: none)")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", type=Path,
                        help="YAML config, or the name of a shipped one (`funkflow configs`; default: the "
                             "embedded demo, configs/default.yaml)")
    _add_overrides(parser)
    _add_cluster_flags(parser)
    parser.add_argument("--report", type=Path, metavar="FILE.html",
                        help="write Dask's performance report of the run (needs funkflow[report]; default: none)")
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help="run directory (output.run_dir; default: the config's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue training from the newest valid checkpoint of the run directory")
    parser.add_argument("--force", action="store_true",
                        help="with --resume: resume even if the config or data changed since the checkpoint "
                             "(never when k or the blocks differ)")
    parser.add_argument("--retrain", action="store_true",
                        help="replace the model of an existing run directory that was trained with another "
                             "configuration (without it, such a run is refused with exit 78)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funkflow", description="Funk-SVD by DSGD on Dask.")
    # The global flags, accepted after the verb too (`funkflow run -q`); there they override.
    logging_flags = argparse.ArgumentParser(add_help=False)
    for flags, default in ((parser, None), (logging_flags, argparse.SUPPRESS)):
        flags.add_argument("-q", "--quiet", action="store_true", default=default or False,
                           help="only warnings and the final result")
        flags.add_argument("--log-format", choices=("text", "json"), default=default or "text",
                           help="json: one JSON object per log line (time, level, stage, epoch, message, metrics); "
                                "default: text")
    parser.add_argument("--version", action="version", version=f"funkflow {package_version('funkflow')}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def add_verb(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return verbs.add_parser(name, parents=[logging_flags], **kwargs)

    for verb, (_, help_text) in STAGE_VERBS.items():
        _add_run_flags(add_verb(verb, help=help_text, description=help_text))
    tune = add_verb(
        "tune", help="search k, reg, bias_reg and lr on the validation RMSE, then train the winner",
        description="Successive halving over trials drawn from the config's tune.space, trained side by side on "
                    "the workers; every trial goes to RUN_DIR/tune.jsonl as it ends (a re-run takes them up), "
                    "the winner's config to RUN_DIR/best.yaml, which is then trained on the training and "
                    "validation ratings and evaluated once on the test ratings.")
    _add_run_flags(tune)
    tune.add_argument("--trials", type=int, metavar="N", help="trials to draw (tune.trials; the first is the "
                                                              "config's own values; default: the config's)")
    tune.add_argument("--time-budget", type=float, metavar="SECONDS",
                      help="stop starting trials after this long and keep the best so far (tune.time_budget; "
                           "default: the config's)")
    night = add_verb(
        "nightly", help="the nightly retrain: ingest the day's export, train warm from the last run, move latest",
        description="Ingest --export into RUNS/DATE, train there warm from the newest earlier run whose model "
                    "exists (for --warm-epochs), evaluate, then point the symlink RUNS/latest at it. Safe to "
                    "re-run: every stage is skipped when up to date, and a second copy exits 75.")
    night.add_argument("config", type=Path, help="YAML config, or the name of a shipped one")
    night.add_argument("--export", required=True, metavar="SRC", help="the day's ratings: a file, directory or URL")
    night.add_argument("--format", choices=FORMATS, default="parquet", help="the export's format (default: parquet)")
    night.add_argument("--runs", type=Path, default=Path("runs/nightly"), metavar="DIR",
                       help="where the dated run directories and latest go (default: runs/nightly)")
    night.add_argument("--warm-epochs", type=int, default=3, metavar="N",
                       help="epochs of a warm start from the previous run (default: 3)")
    night.add_argument("--date", metavar="YYYY-MM-DD", help="the run's date (default: today, UTC)")
    _add_overrides(night)
    _add_cluster_flags(night)
    add_verb("configs", help="list the configs shipped with funkflow, to run by name",
                     description="List the shipped configs: `funkflow run NAME` runs one.")

    generate = add_verb("generate", help="write a synthetic Netflix-shaped dataset",
                                description="Write synthetic Netflix-shaped ratings with a known true model.")
    generate.add_argument("--scale", type=float, required=True,
                          help="1.0 = 480,189 users × 17,770 items, 100,480,507 ratings")
    generate.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    generate.add_argument("--seed", type=int, default=0,
                          help="generator seed: the same seed, the same ratings (default: %(default)s)")
    _add_cluster_flags(generate)

    ingest = add_verb(
        "ingest", help="turn rating files (Netflix, MovieLens, CSV, Parquet) into a canonical dataset",
        description="Parse rating files in parallel into a canonical dataset. Strict by default: a bad line "
                    "ends the ingest (exit 65) naming file, line and reason; --rejects sets bad lines aside.")
    ingest.add_argument("sources", nargs="+", metavar="SRC", help="file, directory, glob or fsspec URL")
    ingest.add_argument("--format", required=True, choices=FORMATS,
                        help="netflix: the Prize's per-movie text files; movielens: u.data, ratings.dat or "
                             "ratings.csv; csv: delimited text, by header names or --*-col; parquet")
    ingest.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    ingest.add_argument("--rejects", type=Path, metavar="FILE",
                        help="write bad lines here (CSV, or Parquet for .parquet) and go on (default: a bad line "
                             "ends the ingest)")
    for role in ("user", "item", "rating", "time"):
        ingest.add_argument(f"--{role}-col", metavar="NAME|N",
                            help=f"{role} column: a header name or a 0-based position (csv, parquet; default: "
                                 f"found by name{', or none' if role == 'time' else ''})")
    ingest.add_argument("--delimiter", help="field delimiter (csv; default: detected from line 1)")
    ingest.add_argument("--rating-scale", metavar="MIN,MAX",
                        help="valid ratings (default: netflix 1,5; movielens by file, u.data and ratings.dat "
                             "1,5, ratings.csv 0.5,5; csv and parquet: inferred from the data)")
    ingest.add_argument("--duplicates", choices=DUPLICATE_POLICIES, default="keep_last",
                        help="a (user, item) pair rated twice: keep the latest (by time, then position), "
                             "the first, the mean, or stop with an error (default: %(default)s)")
    ingest.add_argument("--id-maps", type=Path, metavar="DATASET",
                        help="index users and items as DATASET does (a test set for split.method given); rows "
                             "with ids it lacks are left out and counted (default: index them afresh)")
    ingest.add_argument("--chunk-mb", type=int, default=64, help="text parsed per task, in MiB (default: %(default)s)")
    _add_cluster_flags(ingest)

    predict = add_verb("predict", help="predict ratings for (user, item) pairs of raw ids",
                               description="Predict ratings for pairs (CSV/TSV, Parquet, or the Netflix probe / "
                                           "qualifying layout); unknown ids fall back to biases and are counted.")
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run or a fold-in output")
    predict.add_argument("--pairs", required=True, metavar="FILE", help="the pairs to predict")
    predict.add_argument("--out", type=Path, required=True, metavar="FILE", help=".parquet, .csv or .tsv")
    predict.add_argument("--user-col", metavar="NAME|N", help="user column of the pairs (default: first / 'user')")
    predict.add_argument("--item-col", metavar="NAME|N", help="item column of the pairs (default: second / 'item')")

    rec = add_verb("recommend", help="top-N unseen items per user, computed on the workers",
                           description="Top-N items per user, excluding those rated in training, computed by "
                                       "user block on the workers; Parquet (user, rank, item, score) in raw ids.")
    rec.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run or a fold-in output")
    rec.add_argument("--top", type=int, required=True, metavar="N", help="items per user")
    rec.add_argument("--users", type=Path, metavar="FILE",
                     help="only these raw user ids (text lines or Parquet; default: every user)")
    rec.add_argument("--out", type=Path, required=True, metavar="FILE.parquet",
                     help="the lists: user, rank, item, score (written whole or not at all)")
    _add_cluster_flags(rec, "default: in this process for a model under 25M ratings, else the run's cluster config")

    fold = add_verb("fold-in", help="add users (or items) that arrived after training, without a retrain",
                            description="Compute factors and biases of users (or items) absent from training "
                                        "from their ratings against the fixed factors of the other side (closed-"
                                        "form regularised least squares); write OUT/model for predict.")
    fold.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained run (or an earlier fold-in output)")
    fold.add_argument("--ratings", required=True, metavar="FILE",
                      help="raw (user, item, rating) ratings, CSV/TSV (header or positions 0,1,2) or Parquet")
    fold.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/model")
    fold.add_argument("--side", choices=("users", "items"), default="users",
                      help="fold in the new users of the ratings (default) or the new items")
    fold.add_argument("--rating-scale", metavar="MIN,MAX", help="valid ratings (default: the model's)")

    rep = add_verb("report", help="learning curves (PNG) and a self-contained HTML page of a run",
                           description="Write learning_curves.png, tune.png for a tuned run, and report.html (summary, "
                                       "curves, trials, config); needs funkflow[report].")
    rep.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a trained (or tuned) run directory")
    rep.add_argument("--out", type=Path, metavar="DIR", help="where to write them (default: RUN_DIR)")

    plan = add_verb("plan", help="memory per worker, bytes moved and epoch time for a given problem",
                            description="Size a cluster: memory per worker, bytes moved per epoch and an "
                                        "estimated epoch time from this machine's measured kernel throughput.")
    plan.add_argument("--ratings", type=float, required=True, help="number of ratings (1e10 is fine)")
    plan.add_argument("--users", type=float, required=True, help="number of users")
    plan.add_argument("--items", type=float, required=True, help="number of items")
    plan.add_argument("--k", type=int, default=50, help="latent factors (default: %(default)s)")
    plan.add_argument("--d", type=int, default=None,
                      help="blocks per side (default: what train.d: auto picks for the ratings)")
    plan.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    plan.add_argument("--threads-per-worker", type=int, default=1, help="threads of each worker (default: %(default)s)")
    plan.add_argument("--train-fraction", type=float, default=0.85,
                      help="share of the ratings that train (the default split holds out 10%% test, 5%% validation)")
    plan.add_argument("--rate", type=float, help="kernel ratings/s per thread (default: measure it here)")
    plan.add_argument("--hop-ms", type=float, default=HOP_SECONDS * 1e3,
                      help="milliseconds to hand a column block to another worker, beyond its transfer "
                           "(default: %(default)s, measured between idle workers by scripts/bench_scale.py)")
    plan.add_argument("--bandwidth", type=float, default=BANDWIDTH,
                      help="bytes/s between workers (default: %(default).0e, about 10 GbE)")
    return parser


def _config_of(args: argparse.Namespace) -> Path | None:
    """CONFIG if given; else, for an existing run directory, the configuration it was made with (so a verb
    run on it never trains the embedded demo over its model); else None, the embedded default. A stage verb
    on a run directory that is not there, with no CONFIG and no ``--set data.…``, is refused: it would
    train the demo in a directory the user meant to exist."""
    if args.config is not None or args.run_dir is None:
        return args.config
    # A tune's run directory holds the winner's config; the tune's own is kept beside its trials.
    saved = args.run_dir / ("tune/config.yaml" if args.verb == "tune" else "config.yaml")
    if saved.is_file():
        log.info("using the configuration %s was made with: %s", args.run_dir, saved)
        return saved
    names_data = any(o.startswith("data.") for o in args.overrides)
    if args.verb not in ("run", "tune") and not names_data:  # it would train the demo: a mistyped path, most likely
        raise ConfigError(f"--run-dir {args.run_dir}: no run there (no {saved.name}); give a CONFIG to start one "
                          f"there, or `funkflow run --run-dir {args.run_dir}` for the whole chain")
    return None


def _command_line_values(args: argparse.Namespace) -> dict[str, Any]:
    """Config values the flags give (``--scheduler``, ``--scheduler-file``, ``--run-dir``), as values."""
    values: dict[str, Any] = {}
    if args.scheduler:
        values["cluster.scheduler"] = args.scheduler
    if getattr(args, "scheduler_file", None):
        values["cluster.scheduler_file"] = args.scheduler_file
    if getattr(args, "run_dir", None):
        values["output.run_dir"] = str(args.run_dir)
    return values


def _print_summary(summary: dict, run_dir: str) -> None:
    """The result lines; ``run_dir`` as the user named it (the summary holds it resolved)."""
    line = f"test RMSE {summary['test_rmse']:.4f}  MAE {summary['test_mae']:.4f}"
    floor = summary.get("floor_rmse")
    if floor:
        line += f"  (floor {floor:.4f}, +{100 * (summary['test_rmse'] / floor - 1):.1f}%)"
    base = summary.get("baselines", {})
    if base:
        line += "  baselines: " + ", ".join(f"{name} {m['rmse']:.4f}" for name, m in base.items())
    say(line)
    ranking = summary.get("ranking")
    if ranking and ranking["users"]:
        k, model, popular = ranking["k"], ranking["model"], ranking["popularity"]
        say(f"top-{k} over {ranking['users']:,} users: precision {model['precision']:.4f}  recall "
              f"{model['recall']:.4f}  NDCG {model['ndcg']:.4f}  MAP {model['map']:.4f}  coverage "
              f"{model['coverage']:.3f}  (popularity: NDCG {popular['ndcg']:.4f}, coverage {popular['coverage']:.3f})")
    say(f"run directory: {run_dir}")


def _tune(args: argparse.Namespace) -> None:
    from funkflow.pipeline.app.tune import tune

    given = {"tune.trials": args.trials, "tune.time_budget": args.time_budget}
    config = load_config(_config_of(args), args.overrides).with_values(
        {**_command_line_values(args), **{key: value for key, value in given.items() if value is not None}})
    result = tune(config, retrain=args.retrain)
    best = result.best
    say(f"best of {len({r.trial for r in result.results})} trials: trial {best.trial} "
          f"({', '.join(f'{k} {v:g}' for k, v in best.params.items())}), validation RMSE {best.best_val:.4f} at "
          f"epoch {best.best_epoch}; config in {result.best_config}")
    if result.summary is not None:
        _print_summary(result.summary, config.output.run_dir)


def _generate(args: argparse.Namespace) -> None:
    from funkflow.pipeline.app.stages import synthetic_spec
    from funkflow.pipeline.core.cluster import open_executor
    from funkflow.pipeline.data.dataset import generate_dataset

    # Netflix's shape at --scale: the demo's denser overrides in the default config do not apply.
    try:
        gen = GenerateConfig(scale=args.scale, seed=args.seed)
    except ValidationError as exc:
        raise UsageError(f"--scale must be > 0, got {args.scale}") from exc
    cluster = load_config(None).with_values(_command_line_values(args)).cluster
    with new_output(args.out), open_executor(cluster) as executor:
        dataset = generate_dataset(executor, synthetic_spec(gen), args.out, gen.ratings_per_part, replace=False)
    say(f"{dataset.n_ratings:,} ratings of {dataset.n_users:,} users × {dataset.n_items:,} items in {args.out}")


def _rating_scale(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--rating-scale takes MIN,MAX, e.g. 1,5; got {text!r}") from None
    return low, high


def _ingest(args: argparse.Namespace) -> None:
    from funkflow.pipeline.core.cluster import open_executor
    from funkflow.pipeline.data.ingest import ingest
    from funkflow.pipeline.data.sources import IngestOptions, estimated_ratings

    options = IngestOptions(format=args.format, rating_scale=_rating_scale(args.rating_scale),
                            user_col=args.user_col, item_col=args.item_col, rating_col=args.rating_col,
                            time_col=args.time_col, delimiter=args.delimiter, duplicates=args.duplicates,
                            rejects=args.rejects, chunk_bytes=args.chunk_mb << 20, id_maps=args.id_maps)
    cluster = load_config(None).with_values(_command_line_values(args)).cluster
    with new_output(args.out), open_executor(cluster, estimated_ratings(args.sources), estimated=True) as executor:
        dataset = ingest(executor, args.sources, options, args.out, replace=False)
    meta = dataset.meta
    line = (f"{dataset.n_ratings:,} ratings of {dataset.n_users:,} users × {dataset.n_items:,} items in {args.out}")
    if meta["rejects"]["total"]:
        line += f"; {meta['rejects']['total']:,} lines rejected to {args.rejects}"
    if meta["duplicates"]["pairs"]:
        line += f"; {meta['duplicates']['pairs']:,} duplicated pairs resolved by {args.duplicates}"
    say(line)


def _configs(args: argparse.Namespace) -> None:
    for name, path in shipped_configs().items():
        say(f"{name:<16} {config_description(path)}")


def _plan(args: argparse.Namespace) -> None:
    rate = args.rate or calibrate(args.k)
    d = args.d or auto_d(int(args.ratings))
    sized = Plan(int(args.ratings), int(args.users), int(args.items), args.k, d, args.workers,
                 args.threads_per_worker, args.train_fraction, rate, args.hop_ms / 1e3, args.bandwidth)
    for label, value in sized.rows():
        say(f"{label:<40} {value}")


def _report(args: argparse.Namespace) -> None:
    from funkflow.pipeline.app.report import report

    written, warning = report(args.run_dir, args.out)
    say("\n".join(str(path) for path in written))
    if warning:
        log.warning("%s", warning)


def _fold_in(args: argparse.Namespace) -> None:
    from funkflow.pipeline.serving.foldin import fold_in_run

    folded = fold_in_run(args.run_dir, args.ratings, args.out, args.side, _rating_scale(args.rating_scale))
    say(f"{folded.added:,} {args.side} folded in from {folded.ratings_used:,} ratings; model in "
        f"{args.out / 'model'}")


def _recommend(args: argparse.Namespace) -> None:
    from funkflow.pipeline.serving.recommend import recommend

    named = args.scheduler or args.scheduler_file
    cluster = load_config(None).with_values(_command_line_values(args)).cluster if named else None
    lists = recommend(args.run_dir, args.top, args.out, args.users, cluster)
    say(f"top {args.top} for {lists.n_users:,} users ({lists.n_rows:,} rows) in {lists.out}, "
        f"computed in {lists.seconds:.1f}s")


def _predict(args: argparse.Namespace) -> None:
    from funkflow.pipeline.serving.predict import predict

    predicted = predict(args.run_dir, args.pairs, args.out, args.user_col, args.item_col)
    say(f"{predicted.n_pairs:,} predictions in {predicted.out} ({predicted.unknown_users:,} unknown "
        f"users, {predicted.unknown_items:,} unknown items)")


def _nightly(args: argparse.Namespace) -> None:
    from funkflow.pipeline.app.nightly import nightly

    config = load_config(args.config, args.overrides).with_values(_command_line_values(args))
    summary = nightly(config, args.export, args.format, args.runs, args.warm_epochs, args.date)
    if summary is not None:
        _print_summary(summary, str(args.runs / "latest"))


def _stages(args: argparse.Namespace) -> None:
    """run, train, evaluate, export: the chain of stages up to the verb's."""
    from funkflow.pipeline.app.stages import run_pipeline

    config = load_config(_config_of(args), args.overrides).with_values(_command_line_values(args))
    summary = run_pipeline(config, STAGE_VERBS[args.verb][0], resume=args.resume, force=args.force,
                           report=args.report, retrain=args.retrain)
    if summary is not None:
        _print_summary(summary, config.output.run_dir)
    else:
        say(f"run directory: {config.output.run_dir}")


VERBS: dict[str, Callable[[argparse.Namespace], None]] = {
    **{verb: _stages for verb in STAGE_VERBS},
    "tune": _tune, "nightly": _nightly, "configs": _configs, "generate": _generate, "ingest": _ingest,
    "predict": _predict, "recommend": _recommend, "fold-in": _fold_in, "report": _report, "plan": _plan,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure(args.log_format, args.quiet)
    try:
        VERBS[args.verb](args)
        return EXIT_OK
    except FunkflowError as exc:
        say(f"funkflow: error: {exc}", error=True)
        return exc.exit_code
    except ArtifactError as exc:  # found by a worker task reading a damaged file
        say(f"funkflow: error: {exc}", error=True)
        return EXIT_DATAERR
    except KeyboardInterrupt:
        say("funkflow: interrupted", error=True)
        return 130
    except BrokenPipeError:  # `funkflow configs | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        fault = outside_fault(exc)  # a full disk, a lost scheduler: not funkflow's bug, so no traceback
        if fault is None:
            log.exception("funkflow: internal error (a bug: please report it with this traceback)")
            return EXIT_SOFTWARE
        say(f"funkflow: error: {fault}", error=True)
        return fault.exit_code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
