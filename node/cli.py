"""The ``dicom-node`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from node import __version__
from node.config import Config, DicomDestination, FolderDestination, load_config
from node.errors import NodeError


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
    return parser


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_logging(config.node.log_level)
    from node.service import run_until_signalled  # pynetdicom is slow to import

    run_until_signalled(config, args.config)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(args.path)
    print(describe(config))
    return 0


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
        if isinstance(dest, FolderDestination):
            lines.append(f"  {name}: folder {dest.path} layout {dest.layout}")
        elif isinstance(dest, DicomDestination):
            lines.append(
                f"  {name}: dicom {dest.ae_title}@{dest.host}:{dest.port} "
                f"(as {dest.calling_ae_title}, fallback {dest.fallback})"
            )
    lines.append("rules (first match wins):")
    for i, rule in enumerate(config.rules):
        conditions = [f"{k} in {list(v)}" for k, v in rule.match.attributes]
        if rule.match.calling_ae_title:
            conditions.append(f"calling_ae_title ~ {list(rule.match.calling_ae_title)}")
        if rule.match.called_ae_title:
            conditions.append(f"called_ae_title ~ {list(rule.match.called_ae_title)}")
        if rule.match.peer_networks:
            conditions.append(f"peer_address in {list(rule.match.peer_networks)}")
        when = " and ".join(conditions) or "everything"
        if rule.compress is None:
            action = "send as received"
        else:
            from node.codecs.syntaxes import lookup_syntax

            info = lookup_syntax(rule.compress.transfer_syntax)
            name = info.name if info else rule.compress.transfer_syntax
            action = f"compress to {name} ({rule.compress.transfer_syntax})"
            if rule.compress.plugin:
                action += f" with {rule.compress.plugin}"
        lines.append(f"  [{i}] {rule.name}: {when} -> {action} -> {', '.join(rule.send_to)}")
    return "\n".join(lines)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs every PDU at INFO; keep its own chatter at warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
