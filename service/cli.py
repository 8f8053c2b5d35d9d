"""The ``stalwart`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from typing import TextIO

import yaml

from service.config import RUN_NAME_PATTERN, Config, ConfigError, load_config, redact_secrets

logger = logging.getLogger("service.cli")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file; omitted sections take their defaults")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set optim.lr=3e-4 (repeatable; values are YAML scalars or lists)",
    )


def _add_deepspeed_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from-deepspeed", metavar="DS_CONFIG_JSON",
        help="map a DeepSpeed JSON config onto the config (after --config, before --set); prints the mapping and "
        "every key it cannot honour",
    )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds, for example 130")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stalwart", description="Fault-tolerant pretraining on Ray Train and FSDP2.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run or resume a training job")
    _add_config_arguments(train)
    _add_deepspeed_argument(train)
    train.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: $RAY_ADDRESS; without one, a local cluster on 127.0.0.1 is started)",
    )

    prepare = commands.add_parser("prepare", help="tokenize the corpus into token shards in storage, then exit")
    _add_config_arguments(prepare)

    report = commands.add_parser("report", help="print a run's summary and write a PNG of loss, LR and grad norm")
    report.add_argument("run", help="run name (under storage.uri) or the run's full URI")
    _add_config_arguments(report)
    report.add_argument("--output", "-o", help="PNG path (default: <run name>-report.png in the current folder)")

    from service.checkpoints import add_parser as add_checkpoints_parser

    add_checkpoints_parser(commands, _add_config_arguments)

    from service.planner import add_parser as add_plan_parser

    add_plan_parser(commands, _add_config_arguments)

    stop_node = commands.add_parser(
        "stop-node",
        help="drain this machine's Ray node and send SIGTERM to its training workers, so they save a checkpoint "
        "(for a Kubernetes preStop hook)",
    )
    stop_node.add_argument("--node-id", help="Ray node id of the raylet to stop (default: the only raylet on this machine)")
    stop_node.add_argument("--grace-s", type=_positive_seconds, default=130.0,
                           help="seconds to wait for the workers to exit, and the drain's deadline. Keep it above "
                           "fault_tolerance.stop_grace_s and below the pod's terminationGracePeriodSeconds (default 130)")
    stop_node.add_argument("--no-drain", dest="drain", action="store_false",
                           help="only send SIGTERM, without asking the GCS to drain the node")

    show = commands.add_parser("config", help="print the validated config as YAML")
    _add_config_arguments(show)
    _add_deepspeed_argument(show)
    show.add_argument("--defaults", action="store_true", help="print the default config and ignore --config/--set")
    return parser


def _load(args: argparse.Namespace, mapping_stream: TextIO = sys.stdout) -> Config:
    overrides = list(args.overrides)
    deepspeed_config = getattr(args, "from_deepspeed", None)
    if deepspeed_config:
        from service.deepspeed_import import import_deepspeed_file

        # The base config's world size resolves batch sizes the DeepSpeed file leaves open.
        base = load_config(args.config, args.overrides)
        imported = import_deepspeed_file(deepspeed_config, base.scaling.max_workers)
        for line in imported.report_lines():
            print(line, file=mapping_stream)
        overrides = imported.override_strings() + overrides
    return load_config(args.config, overrides)


def command_train(args: argparse.Namespace) -> int:
    config = _load(args)
    if not args.address:
        # Must be set before Ray is imported: it makes every embedded Ray process listen on 127.0.0.1 only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray.train import TrainingFailedError

    from service.driver import run_training

    try:
        summary = run_training(config, address=args.address)
    except TrainingFailedError as error:
        logger.error("run %s failed after exhausting run.max_failures=%d: %s", config.run.name, config.run.max_failures, error)
        return 1
    for line in summary.lines():
        print(line)
    if summary.stopped:
        from service.driver import EXIT_STOPPED

        return EXIT_STOPPED
    return 0


def command_prepare(args: argparse.Namespace) -> int:
    from service.prepare import prepare_dataset
    from service.storage import absolute_uri

    config = _load(args)
    print(prepare_dataset(config.data, absolute_uri(config.storage.uri), config.storage.options))
    return 0


def _run_uri(run: str, config: Config) -> str:
    """Resolve a RUN argument: a full URI or absolute path as given, or a run name under ``storage.uri``."""
    from service.storage import absolute_uri, join

    if "://" in run or run.startswith("/"):
        return run
    if not re.match(RUN_NAME_PATTERN, run):
        raise ConfigError(f"RUN={run!r} is not a run name (letters, digits, '.', '_' and '-', starting with a letter or "
                          "digit); pass the run's name, or its full URI such as s3://bucket/prefix/run")
    return join(absolute_uri(config.storage.uri), run)


def command_report(args: argparse.Namespace) -> int:
    from service.report import plot_run, summary_lines

    config = _load(args)
    run_uri = _run_uri(args.run, config)
    lines = summary_lines(run_uri, config.storage.options)
    for line in lines:
        print(line)
    if lines and lines[0].startswith("no step history"):
        return 1
    output = args.output or f"{run_uri.rstrip('/').rsplit('/', 1)[-1]}-report.png"
    print(f"plot written to {plot_run(run_uri, output, config.storage.options)}")
    return 0


def command_checkpoints(args: argparse.Namespace) -> int:
    from service.checkpoints import run_command

    config = _load(args)
    return run_command(args, config, _run_uri(args.run, config))


def command_plan(args: argparse.Namespace) -> int:
    from service.planner import run_command

    return run_command(args, None if args.example else _load(args))


def command_config(args: argparse.Namespace) -> int:
    # The DeepSpeed mapping goes to stderr, so stdout stays valid YAML.
    config = Config() if args.defaults else _load(args, mapping_stream=sys.stderr)
    print(yaml.safe_dump(redact_secrets(config.model_dump(mode="json")), sort_keys=False), end="")
    return 0


def command_stop_node(args: argparse.Namespace) -> int:
    """Exit status 0 when every worker exited (or none ran), 1 when some still run, 2 when the command could not run."""
    if args.node_id == "":
        logger.error("stop-node: --node-id is empty. Pass a Ray node id, or leave the option out")
        return 2
    # Ray 2.60's clients send the cluster's token only in token mode, which a process outside the
    # cluster does not know it needs. A cluster without authentication accepts the token as well.
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and ("RAY_AUTH_TOKEN" in os.environ or os.path.isfile(token_path)):
        os.environ["RAY_AUTH_MODE"] = "token"
    from workers.preemption import stop_node

    try:
        running = stop_node(args.node_id, grace_s=args.grace_s, drain=args.drain)
    except (RuntimeError, ValueError) as error:
        logger.error("stop-node: %s", error)
        return 2
    if running:
        logger.error("stop-node: worker processes %s are still running %.0f s after SIGTERM", running, args.grace_s)
        return 1
    return 0


COMMANDS = {"train": command_train, "prepare": command_prepare, "report": command_report, "config": command_config,
            "checkpoints": command_checkpoints, "plan": command_plan, "stop-node": command_stop_node}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as error:
        print(f"stalwart: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
