"""The ``skymoe`` command. Heavy modules are imported inside the commands, so ``--help`` is instant.

It lives with the flows because ``run`` composes stages through Prefect; ``show`` needs only the core.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from skymoe import PIPELINE_STAGES as STAGES


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
    run.add_argument("--executor", choices=("datatrove", "beam"), help="cleaning executor (overrides the config)")

    ablate = commands.add_parser("ablate", help="reproduce one of the report's ablations at small scale (Prefect flow)")
    ablate.add_argument("ablation", choices=("gating-norm", "aux-coef", "init"))
    ablate.add_argument("--config", help="config file or preset name (default: the 'tiny' preset)")
    ablate.add_argument("--root", help="storage root URI (overrides storage.root)")
    ablate.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3); more seeds add runs")
    ablate.add_argument("--smoke", action="store_true", help="a handful of steps of a 2-layer model (tests)")
    ablate.add_argument("--preset", choices=("cpu", "gpu"), help="size: cpu (default, ~30 min on 2 cores) or gpu")

    incremental = commands.add_parser("incremental", help="run the pipeline on input files new since the last "
                                      "generation (what the scheduled deployment does)")
    incremental.add_argument("--config", help="config file or preset name (default: the 'tiny' preset)")
    incremental.add_argument("--root", help="storage root URI (overrides storage.root)")
    incremental.add_argument("--input", dest="input_prefix", metavar="URI",
                             help="the input folder or prefix to watch (overrides clean.inputs)")
    incremental.add_argument("--train-tokens", type=int, help="continued-training tokens (overrides the config)")

    show = commands.add_parser("show", help="list every stage output under a root")
    show.add_argument("--root", help="storage root URI (default: the tiny preset's root)")
    show.add_argument("--config", help="config file or preset name, for its root and S3 settings")
    show.add_argument("--json", action="store_true", help="print one JSON object")

    serve = commands.add_parser("serve", help="local Prefect server + UI, work pool, deployments and worker")
    serve.add_argument("--port", type=int, default=4200, help="port of the server and UI on 127.0.0.1")
    serve.add_argument("--home", help="Prefect state folder: database, results, logs (default: .prefect in the "
                                      "checkout)")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    from skymoe.config import run_overrides

    inputs = [os.path.abspath(p) if "://" not in p else p for p in getattr(args, "inputs", None) or []]
    return run_overrides(getattr(args, "root", None), inputs, getattr(args, "executor", None))


def _cmd_run(args: argparse.Namespace) -> int:
    from skymoe.pipelines.clean.stage import plan_clean
    from skymoe.config import load_config
    from skymoe.storage import Storage

    overrides = _overrides(args)
    # Fail on a bad config, missing inputs or an unusable root before Prefect starts.
    config = load_config(args.config, overrides)
    storage = Storage.from_config(config.storage)
    plan_clean(config.clean, storage, config.storage.root)
    storage.check_writable_root(config.storage.root)
    from skymoe.flows.pipeline import pipeline_flow

    summary = pipeline_flow(config_path=args.config, root=args.root, inputs=overrides.get("clean", {}).get("inputs"),
                            until=args.until, executor=args.executor)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from skymoe.ablations.run import check_ablation, size_of
    from skymoe.pipelines.clean.stage import plan_clean
    from skymoe.config import load_config
    from skymoe.storage import Storage

    # Fail on a bad config, grid, seed count, missing inputs or an unusable root before Prefect starts.
    config = load_config(args.config, _overrides(args))
    size = size_of(args.smoke, args.preset)
    check_ablation(config, args.ablation, args.seeds, size)
    storage = Storage.from_config(config.storage)
    plan_clean(config.clean, storage, config.storage.root)
    storage.check_writable_root(config.storage.root)
    from skymoe.flows.ablate import ablate_flow

    summary = ablate_flow(ablation=args.ablation, config_path=args.config, root=args.root, seeds=args.seeds,
                          size=size)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_incremental(args: argparse.Namespace) -> int:
    from skymoe.flows.generations import load_ledger, plan_generation
    from skymoe.config import load_config, run_overrides
    from skymoe.storage import Storage

    prefix = args.input_prefix
    if prefix and "://" not in prefix:
        prefix = os.path.abspath(prefix)
    overrides = run_overrides(args.root, [prefix] if prefix else None)
    if args.train_tokens is not None:
        overrides["incremental"] = {"train_tokens": args.train_tokens}
    config = load_config(args.config, overrides)
    storage = Storage.from_config(config.storage)
    storage.check_writable_root(config.storage.root)
    ledger = load_ledger(storage, config)
    if plan_generation(config, storage, ledger) is None:  # answered without starting Prefect
        print(f"no new files under {', '.join(config.clean.inputs)} since generation "
              f"{ledger.generations[-1].number}: nothing to do")
        return 0
    from skymoe.flows.incremental import incremental_flow

    summary = incremental_flow(config_path=args.config, root=args.root, input_prefix=prefix,
                               train_tokens=args.train_tokens)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from skymoe.catalog import list_stage_outputs
    from skymoe.config import load_config
    from skymoe.storage import Storage

    config = load_config(args.config, _overrides(args))
    listings = list_stage_outputs(Storage.from_config(config.storage), config.storage.root)
    if args.json:
        print(json.dumps({"stages": [item.to_dict() for item in listings]}, ensure_ascii=False))
        return 0
    if not listings:
        print(f"no stage outputs under {config.storage.root}")
        return 0
    for item in listings:
        state = "complete" if item.complete else "INCOMPLETE"
        counts = ", ".join(f"{k}={v}" for k, v in item.counts.items())
        print(f"{item.name:<10} {item.fingerprint}  {state:<10}  {item.uri}\n{'':<12}{counts}")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    from skymoe.storage import StorageError

    try:
        return {"run": _cmd_run, "ablate": _cmd_ablate, "incremental": _cmd_incremental, "show": _cmd_show,
                "serve": _cmd_serve}[args.command](args)
    except (ValueError, StorageError, OSError) as err:  # bad config, inputs or root: found before any work
        print(f"skymoe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
