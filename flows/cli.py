"""The ``skymoe`` command. Heavy modules are imported inside the commands, so ``--help`` is instant.

It lives with the flows because ``run`` composes stages through Prefect; ``show`` needs only the core.
stdout carries the result alone (a report, or one JSON document with ``--json``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from skymoe import PIPELINE_STAGES as STAGES

if TYPE_CHECKING:
    from skymoe.config import PipelineConfig

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skymoe",
        description="Raw web corpus -> cleaned data -> MoE training -> evaluation, every stage cached and resumable.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline flow through Prefect")
    run.add_argument("--config", help="config file or preset name (default: the 'tiny' preset)")
    run.add_argument("--root", help="storage root URI for all stage outputs (overrides storage.root)")
    run.add_argument("--input", action="append", dest="inputs", metavar="URI",
                     help="input file, folder or glob (repeatable; overrides clean.inputs)")
    run.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run")
    run.add_argument("--executor", choices=("datatrove", "beam", "ray"),
                     help="cleaning executor (overrides the config)")
    run.add_argument("--verify", action="store_true",
                     help="checksum every file of a reused output (default: outputs under 64 MiB only; file sizes "
                          "are always checked); a damaged output is rebuilt")
    _add_set_and_json(run)

    ablate = commands.add_parser("ablate", help="reproduce one of the report's ablations at small scale (Prefect flow)")
    ablate.add_argument("ablation", choices=("gating-norm", "aux-coef", "init", "data-quality"),
                        help="one of the report's ablations, or data-quality: the same model on three cleanings of "
                             "one raw corpus, scored on held-out clean text")
    ablate.add_argument("--config", help="config file or preset name (default: the 'tiny' preset)")
    ablate.add_argument("--root", help="storage root URI (overrides storage.root)")
    ablate.add_argument("--seeds", type=int, default=None,
                        help="seeds per variant (default: the size's, cpu 8, gpu 4, smoke 1); more seeds add runs")
    ablate.add_argument("--smoke", action="store_true", help="a handful of steps of a 2-layer model (tests)")
    ablate.add_argument("--preset", choices=("cpu", "gpu"), help="size: cpu (default, ~30 min on 2 cores) or gpu")
    ablate.add_argument("--steps", type=int, default=None,
                        help="training steps of every gating-norm or aux-coef run (default: the size's, cpu 120, "
                             "gpu 2000); a longer budget gets its own runs and report")
    _add_set_and_json(ablate)

    incremental = commands.add_parser("incremental", help="run the pipeline on input files new since the last "
                                      "generation (what the scheduled deployment does)")
    incremental.add_argument("--config", help="config file or preset name (default: the 'tiny' preset)")
    incremental.add_argument("--root", help="storage root URI (overrides storage.root)")
    incremental.add_argument("--input", dest="input_prefix", metavar="URI",
                             help="the input folder or prefix to watch (overrides clean.inputs)")
    incremental.add_argument("--train-tokens", type=int, help="continued-training tokens (overrides the config)")
    _add_set_and_json(incremental)

    show = commands.add_parser("show", help="list every stage output under a root")
    show.add_argument("--root", help="storage root URI (default: the tiny preset's root)")
    show.add_argument("--config", help="config file or preset name, for its root and S3 settings")
    show.add_argument("--verify", action="store_true",
                      help="checksum every listed file (default: outputs under 64 MiB only; sizes always)")
    show.add_argument("--json", action="store_true", help="print one JSON object")

    serve = commands.add_parser("serve", help="local Prefect server + UI, work pool, deployments and worker")
    serve.add_argument("--port", type=int, default=4200, help="port of the server and UI on 127.0.0.1")
    serve.add_argument("--home", help="Prefect state folder: database, results, logs (default: .prefect in the "
                                      "checkout)")

    node = commands.add_parser("train-node", help="on each machine but the first of a multi-node training run: join "
                               "the runs the first publishes (train.parallel.nodes > 1)")
    node.add_argument("--node-rank", type=int, required=True, help="this machine's node number, 1 to nodes - 1")
    node.add_argument("--config", help="the config the first machine runs (for storage.root and S3 settings)")
    node.add_argument("--root", help="storage root URI (overrides storage.root): the one the first machine uses")
    node.add_argument("--runs", type=int, help="stop after joining this many runs (default: until stopped)")

    tasks = commands.add_parser("tasks", help="the benchmark suites as lm-eval tasks, for the lm_eval command line")
    tasks_commands = tasks.add_subparsers(dest="tasks_command", required=True)
    export = tasks_commands.add_parser(
        "export", help="write the suites' task YAMLs and data into a folder (lm_eval --include_path DIR)")
    export.add_argument("dir", metavar="DIR", help="output folder: new, empty, or written by an earlier export "
                                                  "(then replaced)")
    export.add_argument("--config", help="config file or preset name, for evaluate.data_dir and evaluate.suites "
                                         "(default: the 'tiny' preset)")
    export.add_argument("--data-dir", help="benchmark folder laid out like ../shared/data/bench "
                                           "(overrides evaluate.data_dir)")
    export.add_argument("--suites", nargs="+", metavar="SUITE",
                        help="suites to export, such as mmlu gsm8k piqa (default: the config's evaluate.suites)")
    export.add_argument("--limit", type=_positive_int, metavar="N",
                        help="items per task, per subject for the MMLU family and MATH (overrides the config's limits)")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_set_and_json(command: argparse.ArgumentParser) -> None:
    command.add_argument("--set", action="append", dest="set_items", metavar="KEY=VALUE", default=[],
                         help="override one config field, value as in YAML (repeatable): --set train.dense.steps=20")
    command.add_argument("--json", action="store_true", help="print the flow's summary as one JSON object")


# ---------------------------------------------------------------------------------------- config
def _local(uri: str) -> str:
    """A local path made absolute here: a flow may run with another working directory."""
    return uri if "://" in uri or not uri.strip() else os.path.abspath(uri)  # a blank is refused by the config


def _set_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--set`` items as nested overrides, or None without any (the flows' default)."""
    from skymoe.config import parse_set_overrides

    return parse_set_overrides(args.set_items) if args.set_items else None


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None, inputs: list[str] | None = None,
          executor: str | None = None, extra: dict[str, Any] | None = None) -> PipelineConfig:
    """The config as the flow will load it (flags, then ``--set``), validated before Prefect starts."""
    from skymoe.config import load_config, merge_overrides, run_overrides

    return load_config(args.config, merge_overrides(run_overrides(args.root, inputs, executor), extra or {},
                                                    overrides or {}))


def _print_summary(summary: dict[str, Any], as_json: bool, text: str | None = None) -> None:
    """A flow's summary on stdout: the JSON document with ``--json``, else ``text`` (or a line per key)."""
    from skymoe.report import format_fields

    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        print(text if text is not None else "\n".join(format_fields(summary)))


@contextlib.contextmanager
def _command_flow_runs() -> Iterator[None]:
    """Around a flow run in this process: first mark Crashed the runs of earlier commands that were
    killed (they would show Running forever), then tag this command's runs with its host and pid."""
    from skymoe.flows.serve import command_tags, crash_killed_command_runs
    from prefect import tags
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        crash_killed_command_runs(client)
    with tags(*command_tags()):
        yield


# -------------------------------------------------------------------------------------- commands
def _cmd_run(args: argparse.Namespace) -> int:
    from skymoe.pipeline import check_stages, stage_range
    from skymoe.report import format_run_summary
    from skymoe.storage import Storage

    inputs = [_local(p) for p in args.inputs] if args.inputs else None
    overrides = _set_overrides(args)
    # Fail on a bad config, missing inputs or an unusable root before Prefect starts.
    config = _load(args, overrides, inputs, args.executor)
    storage = Storage.from_config(config.storage)
    check_stages(config, storage, stage_range(until=args.until))
    from skymoe.flows.pipeline import pipeline_flow

    with _command_flow_runs(), contextlib.redirect_stdout(sys.stderr):  # a flow's prints are log, not result
        summary = pipeline_flow(config_path=args.config, root=args.root, inputs=inputs, until=args.until,
                                executor=args.executor or "config", overrides=overrides, verify=args.verify)
    text = None
    if not args.json:
        trained = [result["uri"] for result in summary["results"] if result["stage"] == "train"]
        text = format_run_summary(summary, {uri: storage.disk_usage(uri) for uri in trained})
    _print_summary(summary, args.json, text)
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed, imported here, logs to the stdout it finds first
        from skymoe.ablations.run import check_ablation, size_for, size_of
    from skymoe.pipeline import check_stages
    from skymoe.storage import Storage

    # Fail on a bad config, grid, seed count, missing inputs or an unusable root before Prefect starts.
    overrides = _set_overrides(args)
    config = _load(args, overrides)
    size = size_of(args.smoke, args.preset)
    if args.ablation == "data-quality":
        from skymoe.ablations.data_quality import check

        size_for(args.ablation, size, args.steps)  # refuses --steps: data-quality has its own budgets
        check(config, args.seeds, size)
    else:
        check_ablation(config, args.ablation, args.seeds, size, args.steps)
    check_stages(config, Storage.from_config(config.storage), ("clean", "tokenize"))
    from skymoe.flows.ablate import ablate_flow

    with _command_flow_runs(), contextlib.redirect_stdout(sys.stderr):  # a flow's prints are log, not result
        summary = ablate_flow(ablation=args.ablation, config_path=args.config, root=args.root, seeds=args.seeds,
                              size=size, overrides=overrides, steps=args.steps)
    _print_summary(summary, args.json)
    return 0


def _cmd_incremental(args: argparse.Namespace) -> int:
    from skymoe.config import check_paths
    from skymoe.flows.generations import load_ledger, plan_generation
    from skymoe.storage import Storage

    prefix = _local(args.input_prefix) if args.input_prefix is not None else None
    budget = {"incremental": {"train_tokens": args.train_tokens}} if args.train_tokens is not None else None
    overrides = _set_overrides(args)
    config = _load(args, overrides, [prefix] if prefix is not None else None, extra=budget)
    check_paths(config)
    storage = Storage.from_config(config.storage)
    storage.check_writable_root(config.storage.root)
    ledger = load_ledger(storage, config)
    if plan_generation(config, storage, ledger) is None:  # answered without starting Prefect
        summary = {"generation": None, "new_files": 0, "series": ledger.uri}
        _print_summary(summary, args.json, f"no new files under {', '.join(config.clean.inputs)} since generation "
                                           f"{ledger.generations[-1].number}: nothing to do")
        return 0
    from skymoe.flows.incremental import incremental_flow

    with _command_flow_runs(), contextlib.redirect_stdout(sys.stderr):  # a flow's prints are log, not result
        summary = incremental_flow(root=config.storage.root, config_path=args.config, input_prefix=prefix,
                                   train_tokens=args.train_tokens, overrides=overrides)
    _print_summary(summary, args.json)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from skymoe.catalog import list_stage_outputs, other_folders
    from skymoe.config import load_config, run_overrides
    from skymoe.report import format_listing
    from skymoe.storage import Storage

    config = load_config(args.config, run_overrides(args.root))
    storage, root = Storage.from_config(config.storage), config.storage.root
    listings = list_stage_outputs(storage, root, args.verify)
    if args.json:
        print(json.dumps({"root": root, "stages": [item.to_dict() for item in listings]}, ensure_ascii=False))
    else:
        print(format_listing(listings, root, other_folders(storage, root, listings)))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from skymoe.flows.serve import LocalPrefect, ServeError, serve

    local = LocalPrefect(port=args.port)
    if args.home:
        local.home = Path(args.home).resolve()
    try:
        return serve(local)
    except ServeError as err:
        print(f"skymoe: error: {err}", file=sys.stderr)
        return 1


def _cmd_train_node(args: argparse.Namespace) -> int:
    from skymoe.config import load_config, run_overrides
    from skymoe.storage import Storage
    from skymoe.training.nodes import serve_node

    config = load_config(args.config, run_overrides(args.root))
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped node stops its ranks too (launch.run_ranks)
    try:
        serve_node(Storage.from_config(config.storage), config.storage.root, args.node_rank, runs=args.runs)
    except KeyboardInterrupt:
        logging.getLogger("skymoe.train").info("train-node %d: stopped", args.node_rank)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _cmd_tasks_export(args: argparse.Namespace) -> int:
    """build_tasks into the user's folder: the same YAMLs and data the evaluate stage writes into
    its scratch folder, there for ``lm_eval --include_path``."""
    from pathlib import Path

    from skymoe.config import load_config
    from skymoe.evaluation.tasks import build_tasks, select_suites

    overrides = {"evaluate": {"data_dir": _local(args.data_dir)}} if args.data_dir is not None else None
    evaluate = load_config(args.config, overrides).evaluate
    task_set = build_tasks(evaluate.data_dir, select_suites(evaluate.suites, args.suites, args.limit), Path(args.dir))
    summary = {"include_path": str(task_set.include_path), "tasks": task_set.names, "suites": task_set.summary(),
               "unsafe_code": task_set.unsafe_code}
    _print_summary(summary, args.json, _format_export(summary))
    return 0


def _format_export(summary: dict[str, Any]) -> str:
    """A line per suite, then the lm_eval arguments that select the tasks."""
    lines = [f"lm-eval tasks written to {summary['include_path']}"]
    for suite, info in summary["suites"].items():
        limit = "all items" if info["limit"] is None else f"limit {info['limit']}"
        lines.append(f"  {info['lm_eval_name']:<18} {suite}: {info['tasks']} task(s), {info['items']} items "
                     f"({limit}), {info['num_fewshot']}-shot")
    lines.append(f"lm_eval arguments: --include_path {summary['include_path']} --tasks {','.join(summary['tasks'])}")
    if summary["unsafe_code"]:
        lines.append("skymoe_humaneval runs model-written code: it needs --confirm_run_unsafe_code and "
                     "SKYMOE_RUN_MODEL_CODE=1 (docs/evaluation.md)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- logging
def is_user_error(err: BaseException | None) -> bool:
    """skymoe's own errors about what it was given (a config field, an input, a root): the message
    says what to fix, so it is printed alone. A ValueError from a library is a bug: it keeps its traceback."""
    from skymoe.storage import StorageError

    return isinstance(err, (ValueError, StorageError)) and type(err).__module__.partition(".")[0] == "skymoe"


class ConsoleFilter(logging.Filter):
    """What the terminal shows of Prefect's own logging during a CLI run.

    Warnings, errors and the flow run's link (``View at <UI URL>``, when a Prefect server is set):
    Prefect's other INFO lines (the temporary server, flow run names, every task's final state)
    stay in the UI, and the summary says what ran or was cached. Nothing about a user error:
    Prefect logs it with its traceback from the task, again from the flow, and then both failed
    states, before re-raising it to :func:`main`, which prints its one line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.user_error_seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.exc_info and is_user_error(record.exc_info[1]):
            self.user_error_seen = True
            return False
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            return message.startswith("View at ")
        return not (self.user_error_seen and message.startswith("Finished in state"))


def _configure_logging() -> None:
    """One console handler on stderr, the CLI's, with a fresh :class:`ConsoleFilter` per command.
    Prefect keeps that handler (it adds its own console handler only to a bare root); where Prefect
    or a host program (pytest) configured logging first, their handlers stay, and Prefect's console
    handler is the one filtered."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        root.handlers[0].addFilter(ConsoleFilter())
    for handler in root.handlers:
        stale = [f for f in handler.filters if isinstance(f, ConsoleFilter)]
        if stale or type(handler).__name__ == "PrefectConsoleHandler":
            for old in stale:
                handler.removeFilter(old)
            handler.addFilter(ConsoleFilter())
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging()
    try:
        return {"run": _cmd_run, "ablate": _cmd_ablate, "incremental": _cmd_incremental, "show": _cmd_show,
                "serve": _cmd_serve, "train-node": _cmd_train_node, "tasks": _cmd_tasks_export}[args.command](args)
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"skymoe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
