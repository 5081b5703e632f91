"""The ``dicom-node`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from node import __version__
from node.allocator import keep_large_buffers
from node.config import Config, LogLevel, load_config
from node.destinations import DestinationSettings, type_of
from node.errors import ConfigError, NodeError

if TYPE_CHECKING:
    from node.outbox import Outbox
    from node.spool import Spool

# How many retrying and failed instances `dicom-node queue` lists per destination.
SHOWN = 20


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except NodeError as exc:
        print(f"dicom-node: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description="A compressing DICOM store-and-forward node (C-STORE SCP).",
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the node in the foreground until SIGTERM/SIGINT")
    run.add_argument(
        "--config", metavar="PATH", help="YAML config (default: the embedded default config)"
    )
    run.set_defaults(handler=_run)

    check = commands.add_parser(
        "check-config", help="validate a config and print its rules and destinations"
    )
    check.add_argument("path", metavar="PATH")
    check.set_defaults(handler=_check_config)

    queue = commands.add_parser(
        "queue", help="show each destination's outbox (pending, retrying, failed)"
    )
    queue.add_argument("--config", metavar="PATH", help="YAML config (default: embedded)")
    queue.set_defaults(handler=_queue)
    queue_actions = queue.add_subparsers(dest="queue_action", metavar="ACTION")
    retry = queue_actions.add_parser(
        "retry", help="move failed instances of a destination back to pending"
    )
    retry.add_argument("destination", metavar="DESTINATION")
    retry.add_argument("uids", nargs="*", metavar="SOP_INSTANCE_UID")
    retry.add_argument("--all", action="store_true", help="retry every failed instance")
    # SUPPRESS: otherwise the sub-command's default would hide `queue --config PATH`.
    retry.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS)
    retry.set_defaults(handler=_queue_retry)

    echo = commands.add_parser(
        "echo", help="C-ECHO a dicom destination and list the transfer syntaxes it accepts"
    )
    echo.add_argument("destination", metavar="DESTINATION")
    echo.add_argument("--config", metavar="PATH", help="YAML config (default: embedded)")
    echo.add_argument(
        "--sop-class",
        metavar="UID",
        default="1.2.840.10008.5.1.4.1.1.2",
        help="SOP class to ask about (default: CT Image Storage)",
    )
    echo.set_defaults(handler=_echo)

    drain = commands.add_parser(
        "drain",
        help="make the running node leave its load balancer's pool: /healthz answers 503",
    )
    drain.add_argument(
        "--config", metavar="PATH", help="the running node's config (finds it by its spool)"
    )
    drain.add_argument(
        "--cancel", action="store_true", help="end a drain: /healthz answers ok again"
    )
    drain.set_defaults(handler=_drain)

    codecs = commands.add_parser(
        "codecs",
        help="list the transfer syntaxes this node can write, their encoders, speed and ratio",
    )
    codecs.add_argument(
        "--seconds",
        type=float,
        default=0.5,
        metavar="S",
        help="time spent timing each encoder (default: 0.5)",
    )
    codecs.set_defaults(handler=_codecs)

    from node.batch.options import add_compress_parser

    add_compress_parser(commands)
    return parser


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_logging(config.node.log_level, config.node.log_format)
    keep_large_buffers()  # the receiving process streams image-sized PDUs too
    from node.service import run_until_signalled  # pynetdicom is slow to import

    run_until_signalled(config, args.config)
    return 0


def _drain(args: argparse.Namespace) -> int:
    import os

    from node.drain import DRAIN_SIGNAL, UNDRAIN_SIGNAL, running_node
    from node.errors import StartupError

    config = load_config(args.config)
    spool = config.node.spool
    pid = running_node(spool)
    if pid is None:
        raise StartupError(f"no node runs on spool {spool} (no process holds its lock)")
    os.kill(pid, UNDRAIN_SIGNAL if args.cancel else DRAIN_SIGNAL)
    if args.cancel:
        print(f"node {pid} (spool {spool}): drain cancelled, /healthz answers ok")
    else:
        print(
            f"node {pid} (spool {spool}): draining; /healthz answers 503 and the node still "
            "serves associations; stop it (SIGTERM) or run `dicom-node drain --cancel`"
        )
    return 0


def _codecs(args: argparse.Namespace) -> int:
    # Imported late: it loads every encoder package.
    from node.codecs.bench import format_table, run

    print(format_table(run(seconds=args.seconds)))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.path)
    _check_encoders(config)
    print(describe(config))
    return 0


def _check_encoders(config: Config) -> None:
    """What loading leaves to the workers: is an encoder for each rule installed here?

    Loading checks each ``compress:`` block's syntax and parameters, and the encoder a
    rule names; this also asks the codecs for the rules that name none, so that
    ``check-config`` rejects every rule the workers would. (The node itself does not:
    it would import every encoder package into the receiving process.)
    """
    from node.codecs.spec import spec_problem
    from node.config import spec_error

    for i, rule in enumerate(config.rules):
        problem = None if rule.compress is None else spec_problem(rule.compress)
        if problem is not None:
            raise ConfigError(spec_error(problem, f"rules[{i}].compress"))


def _queue(args: argparse.Namespace) -> int:
    from node.outbox import Outbox
    from node.spool import Spool

    config = load_config(args.config)
    spool = Spool(config.node.spool)
    blocks = [
        _describe_outbox(name, dest, Outbox(spool, name), spool)
        for name, dest in config.destinations.items()
    ]
    print("\n".join(blocks) if blocks else "no destinations")
    return 0


def _describe_outbox(name: str, dest: DestinationSettings, outbox: Outbox, spool: Spool) -> str:
    import time

    from node.outbox import sop_instance_uid_of

    now = time.time()
    pending = outbox.list_pending()
    retrying = [p for p in pending if p.state.attempts]
    failed = outbox.list_failed()
    kind = type_of(dest)
    lines = [
        f"{name} ({kind.summary(dest)}): {len(pending) - len(retrying)} pending, "
        f"{len(retrying)} retrying, {len(failed)} failed",
        *kind.status_lines(dest, spool),
    ]
    peer = outbox.read_peer()
    if peer.failures:
        lines.append(
            f"  peer unreachable since {_when(peer.down_since or now)}, {peer.failures} failed "
            f"attempt(s), next at {_when(peer.next_attempt, now)}: {peer.last_error}"
        )
    for item in retrying[:SHOWN]:
        state = item.state
        lines.append(
            f"  retrying {sop_instance_uid_of(item.path) or item.id}: attempt {state.attempts}, "
            f"next at {_when(state.next_attempt, now)}: {state.last_error}"
        )
    if len(retrying) > SHOWN:
        lines.append(f"  ... and {len(retrying) - SHOWN} more retrying")
    for gone in failed[:SHOWN]:
        info = gone.info
        status = f" status {info['status']}" if info.get("status") else ""
        comment = f" ({info['error_comment']})" if info.get("error_comment") else ""
        lines.append(
            f"  failed {gone.sop_instance_uid or gone.id}:{status}{comment} at "
            f"{_when(info.get('time') or now)} after {info.get('attempts', 0)} attempt(s): "
            f"{info.get('error', 'reason unknown')}"
        )
    if len(failed) > SHOWN:
        lines.append(f"  ... and {len(failed) - SHOWN} more failed")
    return "\n".join(lines)


def _when(seconds: float, now: float | None = None) -> str:
    import time

    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    if now is not None:
        delta = seconds - now
        text += f" (in {delta:.0f} s)" if delta > 0 else " (due)"
    return text


def _queue_retry(args: argparse.Namespace) -> int:
    from node.errors import OutboxError
    from node.outbox import Outbox
    from node.spool import Spool

    config = load_config(getattr(args, "config", None))
    _destination(config, args.destination)
    if args.all == bool(args.uids):
        raise OutboxError("queue retry: name SOP Instance UIDs or give --all (not both)")
    outbox = Outbox(Spool(config.node.spool), args.destination)
    ids = outbox.failed_ids() if args.all else outbox.failed_ids_for(args.uids)
    moved = outbox.retry(ids)
    print(
        f"{args.destination}: {len(moved)} instance(s) moved back to pending; a running node "
        "picks them up within seconds"
    )
    return 0


def _echo(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    dest = _destination(config, args.destination)
    print(type_of(dest).echo(dest, args.sop_class))
    return 0


def _destination(config: Config, name: str) -> DestinationSettings:
    if name not in config.destinations:
        raise ConfigError(
            f"{name!r} is not a destination of {config.source}; defined: "
            f"{', '.join(config.destinations) or '(none)'}"
        )
    return config.destinations[name]


def describe(config: Config) -> str:
    """The resolved config, as an operator wants to read it."""
    node = config.node
    lines = [
        f"config: {config.source}",
        f"node: AE title {node.ae_title}, listening on {node.host}:{node.port}, "
        f"max PDU {node.max_pdu}, {node.worker_count} workers, spool {node.spool}",
        "destinations:",
    ]
    for name, dest in config.destinations.items():
        lines.append(f"  {name}: {type_of(dest).describe(dest)}")
    lines.append("rules (first match wins):")
    for i, rule in enumerate(config.rules):
        conditions = [f"{k} in {list(v)}" for k, v in rule.match.attributes]
        if rule.match.calling_ae_title:
            conditions.append(f"calling_ae_title ~ {list(rule.match.calling_ae_title)}")
        if rule.match.called_ae_title:
            conditions.append(f"called_ae_title ~ {list(rule.match.called_ae_title)}")
        if rule.match.peer_networks:
            conditions.append(f"peer_address in {[str(n) for n in rule.match.peer_networks]}")
        when = " and ".join(conditions) or "everything"
        batch = ""
        if rule.match.calling_ae_title or rule.match.called_ae_title or rule.match.peer_networks:
            batch = " (warning: never matches in `dicom-node compress`, which has no sender)"
        if rule.compress is None:
            action = "send as received"
        else:
            from node.codecs.syntaxes import lookup_syntax

            info = lookup_syntax(rule.compress.transfer_syntax)
            name = info.name if info else rule.compress.transfer_syntax
            action = f"compress to {name} ({rule.compress.transfer_syntax})"
            if rule.compress.plugin:
                action += f" with {rule.compress.plugin}"
        lines.append(f"  [{i}] {rule.name}: {when} -> {action} -> {', '.join(rule.send_to)}{batch}")
    return "\n".join(lines)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _setup_logging(level: LogLevel, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.number, handlers=[handler])
    # pynetdicom logs every PDU at INFO; keep its own chatter at warnings.
    # pynetdicom logs every refused connection and broken PDU at ERROR; the node logs
    # what matters of those itself (one line per association or retry).
    logging.getLogger("pynetdicom").setLevel(
        logging.WARNING if level is LogLevel.DEBUG else logging.CRITICAL
    )


if __name__ == "__main__":
    sys.exit(main())
