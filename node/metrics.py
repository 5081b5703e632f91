"""Prometheus metrics and ``/healthz``, served on loopback by default.

Each node owns its registry (no process-global collectors), so tests can run
several nodes in one process.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from node.config import MetricsSettings
from node.outcome import Outcome, Status

log = logging.getLogger("dicom_node.metrics")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A client silent this long (a half-open health check) is dropped.
REQUEST_TIMEOUT = 10.0


class _Depths(Collector):
    """Queue depths, read when scraped rather than tracked on every change."""

    def __init__(
        self, backlog: Callable[[], int], outboxes: Callable[[], dict[str, tuple[int, int]]]
    ) -> None:
        self._backlog = backlog
        self._outboxes = outboxes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "dicom_node_backlog", "Acknowledged instances not yet routed", value=self._backlog()
        )
        pending = GaugeMetricFamily(
            "dicom_node_outbox_pending",
            "Instances waiting in a destination's outbox",
            labels=["destination"],
        )
        failed = GaugeMetricFamily(
            "dicom_node_outbox_failed",
            "Instances a destination gave up on (in its failed/ folder)",
            labels=["destination"],
        )
        for name, (waiting, given_up) in self._outboxes().items():
            pending.add_metric([name], waiting)
            failed.add_metric([name], given_up)
        yield pending
        yield failed


class Metrics:
    def __init__(
        self, backlog: Callable[[], int], outboxes: Callable[[], dict[str, tuple[int, int]]]
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "dicom_node_instances_received",
            "C-STORE requests answered, by result",
            ["result"],
            registry=r,
        )
        self.bytes_in = Counter("dicom_node_bytes_in", "Data set bytes received", registry=r)
        self.store_seconds = Histogram(
            "dicom_node_cstore_response_seconds",
            "Time from data set received to C-STORE answer",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.routed = Counter(
            "dicom_node_instances_routed",
            "Instances routed by the workers",
            ["status", "transfer_syntax", "compressed"],
            registry=r,
        )
        self.bytes_out = Counter(
            "dicom_node_bytes_out", "Bytes written after compression", registry=r
        )
        self.ratio = Histogram(
            "dicom_node_compression_ratio",
            "Input bytes over output bytes per compressed instance",
            buckets=(1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 20, 50),
            registry=r,
        )
        self.compress_seconds = Histogram(
            "dicom_node_processing_seconds",
            "Worker time per instance (read, compress, write)",
            registry=r,
        )
        self.delivery_errors = Counter(
            "dicom_node_delivery_errors",
            "Deliveries that failed at first try and were queued",
            registry=r,
        )
        self.protocol_errors = Counter(
            "dicom_node_protocol_errors",
            "Connections aborted because what the peer sent broke pynetdicom's reactor",
            ["error"],
            registry=r,
        )
        r.register(_Depths(backlog, outboxes))

    def protocol_error(self, kind: str) -> None:
        self.protocol_errors.labels(kind).inc()

    def received(self, size: int, ok: bool, seconds: float) -> None:
        self.instances_received.labels("stored" if ok else "refused").inc()
        self.bytes_in.inc(size)
        self.store_seconds.observe(seconds)

    def routed_instance(self, outcome: Outcome) -> None:
        self.routed.labels(outcome.status, outcome.transfer_syntax, str(outcome.compressed)).inc()
        if outcome.status != Status.DELIVERED:
            return
        self.bytes_out.inc(outcome.bytes_out)
        self.compress_seconds.observe(outcome.seconds)
        if outcome.compressed and outcome.bytes_out:
            self.ratio.observe(outcome.bytes_in / outcome.bytes_out)
        if outcome.errors:
            self.delivery_errors.inc(len(outcome.errors))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up early is routine, not an error.

    Load balancers' health checks often reset the connection as soon as they have
    the status line (HAProxy does), or before: http.server would print a traceback
    for each on stderr.
    """

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("metrics client %s hung up early: %s", client_address, error)
            return
        log.exception("metrics request from %s failed", client_address)


def start_metrics(
    settings: MetricsSettings, metrics: Metrics, draining: Callable[[], bool] = lambda: False
) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` in a daemon thread.

    ``/healthz`` answers 200 ``ok``, or 503 ``draining`` while the node drains, so
    that a load balancer stops sending it new associations.
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            status = 200
            if self.path == "/metrics":
                body, kind = metrics.exposition(), CONTENT_TYPE
            elif self.path == "/healthz":
                status, body = (503, b"draining\n") if draining() else (200, b"ok\n")
                kind = "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the log

    server = _QuietServer((settings.host, settings.port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s:%s/metrics", settings.host, settings.port)
    return server
