"""The running node: spool, workers and the listening SCP wired together."""

from __future__ import annotations

import logging
import signal
import ssl
import threading
import time
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.registry import Collector  # dicomweb (issue 17)
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from node.config import RESTART_ONLY, Config, load_config
from node.destinations import Runner
from node.destinations.commitment import INVALID_ARGUMENT, transaction_uid
from node.drain import DRAIN_SIGNAL, UNDRAIN_SIGNAL, DrainState
from node.errors import ConfigError, StartupError
from node.metrics import Metrics, start_metrics
from node.outcome import Outcome
from node.pipeline import Pipeline
from node.receivers import ReceiverPool
from node.scp import (
    Door,
    Gatekeeper,
    NoDelayAssociationServer,
    build_ae,
    enable_any_storage_class,
    handlers,
    server_tls_context,
)
from node.senders import start_runners
from node.spool import Spool, SpoolLock
from node.systemd import Notifier

log = logging.getLogger("dicom_node")

# How long a stop waits for associations in progress (after the listeners closed)
# before aborting them.
FINISH_SECONDS = 30.0


class Node:
    """One node process. ``start`` binds and returns; ``stop`` shuts down in order."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.spool = Spool(config.node.spool, config.node.min_free_space)
        self.spool_lock = SpoolLock(config.node.spool)
        self.pipeline = Pipeline(config, self.spool, on_outcome=self._routed)
        self.runners: dict[str, Runner] = {}
        self.metrics = Metrics(self.pipeline.backlog, self._outbox_depths)
        self.metrics.registry.register(self._held_collector())  # dicomweb (issue 17)
        self.metrics_server: ThreadingHTTPServer | None = None
        self._ae: AE | None = None
        self._gatekeeper: Gatekeeper | None = None
        self._servers: list[NoDelayAssociationServer] = []
        self._receivers: ReceiverPool | None = None
        self.drain = DrainState()

    def start(self) -> None:
        self.spool_lock.acquire()  # before create(), which removes partial writes
        self.spool.create()
        self.runners = start_runners(self.config, self.spool)
        left_over = self.pipeline.start()
        if left_over:
            log.info("recovered %d instance(s) left in the spool by an earlier run", left_over)
        if self.config.node.metrics is not None:
            try:
                self.metrics_server = start_metrics(
                    self.config.node.metrics, self.metrics, self.drain.is_draining
                )
            except OSError as exc:
                self.pipeline.stop()
                m = self.config.node.metrics
                raise StartupError(
                    f"node.metrics: cannot listen on {m.host}:{m.port}: {exc.strerror or exc}"
                ) from exc
        settings = self.config.node
        if settings.receiver_count > 1:
            self._start_receivers(settings.receiver_count)
            return
        enable_any_storage_class()
        self._ae = build_ae(settings)
        self._gatekeeper = Gatekeeper(settings)
        evt_handlers = handlers(
            self.spool,
            self.pipeline.submit,
            self._gatekeeper,
            self.metrics,
            commitment_report=self._commitment_report,
        )
        listeners: list[tuple[int, ssl.SSLContext | None]] = []
        if settings.port is not None:
            listeners.append((settings.port, None))
        if settings.tls is not None:
            listeners.append((settings.tls.port, server_tls_context(settings.tls)))
        gatekeeper = self._gatekeeper
        door = Door(
            proxy_protocol=lambda: gatekeeper.settings.proxy_protocol,
            draining=self.drain.is_draining,
            handshake_timeout=lambda: gatekeeper.settings.acse_timeout,
        )
        for port, tls in listeners:
            self._listen(settings.host, port, tls, evt_handlers, door)
        log.info(
            "ready: AE title %s listening on %s (spool %s, %d workers)",
            settings.ae_title,
            ", ".join(self._addresses()),
            settings.spool,
            settings.worker_count,
        )

    def _start_receivers(self, count: int) -> None:
        """``node.receivers`` > 1: receiving processes listen, this one does not."""
        self._receivers = ReceiverPool(
            self.config,
            self.pipeline.submit,
            self._commitment_report,
            self.metrics,
            count,
            rescan=self.pipeline.rescan,
        )
        try:
            self._receivers.start()
        except StartupError:
            self.stop()
            raise
        settings = self.config.node
        ports = [str(settings.port)] if settings.port is not None else []
        if settings.tls is not None:
            ports.append(f"{settings.tls.port} (TLS)")
        log.info(
            "ready: AE title %s listening on %s port %s in %d receiving processes "
            "(spool %s, %d workers)",
            settings.ae_title,
            settings.host,
            ", ".join(ports),
            count,
            settings.spool,
            settings.worker_count,
        )

    def _listen(
        self, host: str, port: int, tls: ssl.SSLContext | None, evt_handlers: list[Any], door: Door
    ) -> None:
        assert self._ae is not None
        try:
            server = self._ae.make_server(
                (host, port),
                evt_handlers=evt_handlers,
                ssl_context=tls,
                server_class=NoDelayAssociationServer,
            )
        except OSError as exc:
            self.stop()
            raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        # make_server builds the server_class given, typed as its base class.
        assert isinstance(server, NoDelayAssociationServer)
        server.door = door
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, name=f"acceptor-{port}", daemon=True).start()

    def _addresses(self) -> list[str]:
        out = []
        for server in self._servers:
            host, port = server.server_address[:2]
            out.append(f"{host}:{port}" + (" (TLS)" if server.ssl_context else ""))
        return out

    def _held_collector(self) -> Collector:
        """dicomweb (issue 17): which destinations are held for refused credentials."""
        from node.destinations.dicomweb import HeldCollector

        return HeldCollector(
            self.spool,
            lambda: [n for n, d in self.config.destinations.items() if d.type == "dicomweb"],
        )

    def _outbox_depths(self) -> dict[str, tuple[int, int]]:
        """(pending, failed) per destination, counted when metrics are scraped."""
        return {
            name: (_count(self.spool.pending_dir(name)), _count(self.spool.failed_dir(name)))
            for name in self.config.destinations
        }

    def _commitment_report(self, event_type: int, info: Dataset | None) -> int:
        """Route a Storage Commitment report to the destination that owns its transaction."""
        uid = transaction_uid(info)
        for runner in list(self.runners.values()):
            status = runner.commitment_report(uid, event_type, info)
            if status is not None:
                return status
        log.warning("storage commitment report for unknown transaction %r ignored", uid)
        return INVALID_ARGUMENT

    def _routed(self, outcome: Outcome) -> None:
        self.metrics.routed_instance(outcome)
        for name in outcome.queued:
            runner = self.runners.get(name)
            if runner is not None:
                runner.notify()

    def stop(self) -> None:
        """Stop accepting, let associations in progress finish, finish workers' jobs."""
        for server in self._servers:
            server.shutdown()
        deadline = time.monotonic() + FINISH_SECONDS
        while self._busy_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        for server in self._servers:
            for assoc in server.active_associations:
                log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
        self._servers.clear()
        if self._receivers is not None:  # each lets its associations finish, then exits
            self._receivers.stop()
            self._receivers = None
        self.pipeline.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        stop_all(self.runners)
        log.info("stopped; %d instance(s) wait in the spool", len(self.spool.list_incoming()))
        self.spool_lock.release()

    def reload(self, config_path: str | None) -> None:
        """Apply a re-read config to instances not yet routed; keep the old one if invalid."""
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        config = self._keep_listening_settings(config)
        if self._gatekeeper is not None:
            self._gatekeeper.settings = config.node  # the next association sees it
        if self._receivers is not None:
            self._receivers.reload(config)
        stop_all(self.runners)
        self.config = config
        self.pipeline.reconfigure(config)
        self.runners = start_runners(config, self.spool)
        log.info(
            "reloaded %s: %d rules, %d destinations",
            config.source,
            len(config.rules),
            len(config.destinations),
        )

    def _busy_associations(self) -> list[Association]:
        # A connection that never sent an A-ASSOCIATE-RQ (a port probe) has nothing to finish.
        return [a for s in self._servers for a in s.active_associations if a.is_established]

    def _keep_listening_settings(self, config: Config) -> Config:
        """Node settings that a running process cannot change stay as they are."""
        old, new = self.config.node, config.node
        changed = [f for f in RESTART_ONLY if getattr(old, f) != getattr(new, f)]
        if changed:
            log.warning("reload: node.%s take effect at the next restart", ", node.".join(changed))
        return replace(config, node=replace(new, **{f: getattr(old, f) for f in RESTART_ONLY}))

    def status_line(self) -> str:
        waiting = f"{self.pipeline.backlog()} instance(s) waiting for workers"
        if self.drain.is_draining():
            return f"draining, {len(self._busy_associations())} association(s) in progress; " + (
                waiting
            )
        return waiting

    def start_draining(self, why: str) -> None:
        if self.drain.start():
            log.info(
                "draining (%s): /healthz answers 503; the listeners close %gs from now if "
                "the node stops",
                why,
                self.config.node.drain_window,
            )

    def stop_draining(self) -> None:
        if self.drain.cancel():
            log.info("drain cancelled: /healthz answers ok again")

    def tell_receivers_about_draining(self) -> None:
        """Receiving processes close the balancer's DICOM-level checks while draining."""
        if self._receivers is not None:
            self._receivers.draining(self.drain.is_draining())


def _count(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.dcm")) if folder.is_dir() else 0


def stop_all(runners: dict[str, Runner]) -> None:
    """Stop the runners side by side: one black-holed peer must not hold up the rest."""
    threads = [threading.Thread(target=r.stop, name=f"stop-{n}") for n, r in runners.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_until_signalled(config: Config, config_path: str | None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the config file; SIGUSR1 drains,
    SIGUSR2 ends a drain.

    SIGTERM drains first: the listeners stay open for ``node.drain_window`` seconds
    while ``/healthz`` answers 503, then close; SIGINT (Ctrl-C) stops at once.
    """
    node = Node(config)
    notifier = Notifier()
    stopping = threading.Event()
    hurry = threading.Event()
    reloads = threading.Event()
    drains: list[int] = []  # signals to act on, in order (appended by the handlers)
    wake = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if signum == signal.SIGTERM:
            node.drain.start()  # /healthz says so from this moment
        else:
            hurry.set()
        drains.append(signum)
        stopping.set()
        wake.set()

    def request_reload(_signum: int, _frame: object) -> None:
        reloads.set()
        wake.set()

    def request_drain(signum: int, _frame: object) -> None:
        drains.append(signum)
        wake.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_reload)
    signal.signal(DRAIN_SIGNAL, request_drain)
    signal.signal(UNDRAIN_SIGNAL, request_drain)
    try:
        node.start()
        notifier.ready(node.status_line())
        tick = min(5.0, notifier.watchdog_interval or 5.0)
        while not stopping.is_set():
            wake.wait(tick)
            wake.clear()
            _act_on_drain_signals(node, drains)
            if stopping.is_set():
                break
            if reloads.is_set():
                reloads.clear()
                notifier.reloading()
                node.reload(config_path)
                notifier.ready(node.status_line())
            notifier.watchdog()
            notifier.status(node.status_line())
        _act_on_drain_signals(node, drains)
        notifier.stopping()
        _wait_out_drain_window(node, notifier, hurry, wake, tick)
        node.stop()
    except BaseException:
        node.spool_lock.release()  # stop() releases it on the way out; so does an error
        raise


def _act_on_drain_signals(node: Node, signals: list[int]) -> None:
    if signals:
        _act_on(node, signals)
        node.tell_receivers_about_draining()


def _act_on(node: Node, signals: list[int]) -> None:
    while signals:
        signum = signals.pop(0)
        if signum == DRAIN_SIGNAL:
            node.start_draining("dicom-node drain")
        elif signum == UNDRAIN_SIGNAL:
            node.stop_draining()
        elif signum == signal.SIGTERM:
            window = node.drain.remaining(node.config.node.drain_window)
            log.info(
                "received SIGTERM, shutting down: /healthz answers 503 (draining), the "
                "listeners close in %.1fs, then associations in progress get up to %gs",
                window,
                FINISH_SECONDS,
            )
        else:
            log.info("received %s, shutting down", signal.Signals(signum).name)


def _wait_out_drain_window(
    node: Node, notifier: Notifier, hurry: threading.Event, wake: threading.Event, tick: float
) -> None:
    """Keep serving until the drain window has passed (a second SIGINT cuts it short)."""
    window = node.config.node.drain_window
    while not hurry.is_set() and (left := node.drain.remaining(window)) > 0:
        wake.wait(min(tick, left))
        wake.clear()
        notifier.watchdog()
        notifier.status(node.status_line())
