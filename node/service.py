"""The running node: spool, workers and the listening SCP wired together."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import replace

from pynetdicom import AE

from node.config import Config, load_config
from node.destinations import Runner, start_runners
from node.errors import ConfigError, StartupError
from node.pipeline import Pipeline
from node.scp import NoDelayAssociationServer, build_ae, enable_any_storage_class, handlers
from node.spool import Spool
from node.systemd import Notifier
from node.workers import Outcome

log = logging.getLogger("dicom_node")

# How long SIGTERM waits for associations in progress before aborting them.
DRAIN_SECONDS = 30.0


class Node:
    """One node process. ``start`` binds and returns; ``stop`` shuts down in order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.node.spool)
        self.pipeline = Pipeline(config, self.spool, on_outcome=self._wake_runners)
        self.runners: dict[str, Runner] = {}
        self._ae: AE | None = None
        self._server: NoDelayAssociationServer | None = None
        self._serving: threading.Thread | None = None

    def start(self) -> None:
        self.spool.create()
        self.runners = start_runners(self.config, self.spool)
        left_over = self.pipeline.start()
        if left_over:
            log.info("recovered %d instance(s) left in the spool by an earlier run", left_over)
        enable_any_storage_class()
        settings = self.config.node
        self._ae = build_ae(settings)
        try:
            self._server = self._ae.make_server(
                (settings.host, settings.port),
                evt_handlers=handlers(self.spool, self.pipeline.submit),
                server_class=NoDelayAssociationServer,
            )
        except OSError as exc:
            self.pipeline.stop()
            raise StartupError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from exc
        self._serving = threading.Thread(
            target=self._server.serve_forever, name="acceptor", daemon=True
        )
        self._serving.start()
        host, port = self._server.server_address[:2]
        log.info(
            "ready: AE title %s listening on %s:%s (spool %s, %d workers)",
            settings.ae_title,
            host,
            port,
            settings.spool,
            settings.worker_count,
        )

    def _wake_runners(self, outcome: Outcome) -> None:
        for name in outcome.queued:
            runner = self.runners.get(name)
            if runner is not None:
                runner.notify()

    def stop(self) -> None:
        """Stop accepting, let associations in progress finish, finish workers' jobs."""
        if self._server is not None:
            self._server.shutdown()
            deadline = time.monotonic() + DRAIN_SECONDS
            while self._server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self._server.active_associations:
                log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
        self.pipeline.stop()
        for runner in self.runners.values():
            runner.stop()
        log.info("stopped; %d instance(s) wait in the spool", len(self.spool.list_incoming()))

    def reload(self, config_path: str | None) -> None:
        """Apply a re-read config to instances not yet routed; keep the old one if invalid."""
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        if config.node != self.config.node:
            log.warning("reload: changes under node: take effect at the next restart")
            config = replace(config, node=self.config.node)
        for runner in self.runners.values():
            runner.stop()
        self.config = config
        self.pipeline.reconfigure(config)
        self.runners = start_runners(config, self.spool)
        log.info(
            "reloaded %s: %d rules, %d destinations",
            config.source,
            len(config.rules),
            len(config.destinations),
        )

    def status_line(self) -> str:
        return f"{self.pipeline.backlog()} instance(s) waiting for workers"


def run_until_signalled(config: Config, config_path: str | None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the config file."""
    node = Node(config)
    notifier = Notifier()
    stopping = threading.Event()
    reloads = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, lambda _s, _f: reloads.set())
    node.start()
    notifier.ready(node.status_line())
    tick = min(5.0, notifier.watchdog_interval or 5.0)
    while not stopping.wait(tick):
        if reloads.is_set():
            reloads.clear()
            notifier.reloading()
            node.reload(config_path)
            notifier.ready(node.status_line())
        notifier.watchdog()
        notifier.status(node.status_line())
    notifier.stopping()
    node.stop()
