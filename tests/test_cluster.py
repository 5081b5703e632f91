"""Nodes behind a load balancer (issue 16): PROXY protocol v1/v2 on the DICOM and TLS
ports, two nodes behind a real HAProxy built from deploy/haproxy/haproxy.cfg, the
allow-list through the balancer, a node killed or drained mid-run, /healthz under
HAProxy's checks, and Storage Commitment from two nodes to one Orthanc.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pydicom
import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultLocal
from proxyprotocol.v2 import ProxyProtocolV2
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from tests import images, rawscu
from tests.conftest import (
    ROOT,
    NodeFactory,
    RunningNode,
    default_config,
    free_port,
    guarded,
    storescu,
    wait_for_port,
)
from tests.test_forward import dicom_destination, outbox_files, write_all
from tests.test_operations import make_certificates

HAPROXY = Path("/usr/sbin/haproxy")
TEMPLATE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
AS_RECEIVED = """
  - name: as-received
    send_to: [archive]
"""
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# ----------------------------------------------------------------------------- helpers


def small_cts(count: int, seed: int = 0) -> list[Dataset]:
    return [images.make_ct(rows=32, cols=32, seed=seed + i) for i in range(count)]


def archived_uids(*nodes: RunningNode) -> list[str]:
    """SOP Instance UIDs of every archived file of ``nodes`` (duplicates kept)."""
    return [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for node in nodes
        for p in node.archived()
    ]


def start_node(
    nodes: NodeFactory,
    name: str,
    node_extra: str,
    *,
    port: int | None = None,
    rules: str = AS_RECEIVED,
    ae_title: str = "TEST-NODE",
    extra_destinations: str = "",
) -> RunningNode:
    root = nodes.tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    text = default_config(
        root,
        port,
        rules,
        extra_destinations,
        workers=1,
        node_extra=node_extra,
        log_level="INFO",
    ).replace("ae_title: TEST-NODE", f"ae_title: {ae_title}")
    return nodes.start(text, root=root, port=port)


def proxied_node_extra(metrics_port: int, trusted: str = "127.0.0.1", extra: str = "") -> str:
    return f"""
        proxy_protocol: {{trusted: [{trusted}]}}
        metrics: {{host: 127.0.0.1, port: {metrics_port}}}
        {extra}
        """


@dataclass
class Balancer:
    """A real HAProxy process, configured from the deploy template."""

    proc: subprocess.Popen
    port: int
    stats: Path
    log: Path

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats))
            s.sendall(line.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """Per server of the DICOM backend: HAProxy's statistics row (status, stot...)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r.get("pxname") == "dicom_nodes"}

    def wait_status(self, wanted: dict[str, str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {name: row["status"] for name, row in self.servers().items()}
            if all(states.get(k, "").startswith(v) for k, v in wanted.items()):
                return
            time.sleep(0.1)
        raise AssertionError(f"servers {self.servers()} not {wanted}; log:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def balancer_config(
    port: int,
    backends: list[tuple[int, int]],
    stats: Path,
    *,
    check: str = "http",
    timing: str = "inter 300ms fall 1 rise 2",
    retries: bool = True,
) -> str:
    """deploy/haproxy/haproxy.cfg with this test's global section, addresses and timing.

    ``backends``: (DICOM port, metrics port) per node. ``check="dicom"`` uses the
    template's commented-out DICOM-level check instead of /healthz.
    """
    template = TEMPLATE.read_text()
    body = template[template.index("\ndefaults") : template.index("# DICOM TLS")]
    if check == "dicom":
        alt = template[template.index("# backend dicom_nodes") : template.index("# Optional:")]
        alt = "\n".join(line[2:] if line.startswith("# ") else "" for line in alt.splitlines())
        body = body[: body.index("\nbackend dicom_nodes")] + "\n" + alt + "\n"
    body = body.replace("bind :11112", f"bind 127.0.0.1:{port}")
    assert body.count("inter 2s fall 2 rise 3") == 1, body
    body = body.replace("inter 2s fall 2 rise 3", timing)
    body = re.sub(r"^ *server node\d+ .*\n", "", body, flags=re.M)
    if not retries:  # so that a refused connection reaches the sender
        body = body.replace("option redispatch", "").replace("retries 3", "retries 0")
    for i, (dicom, metrics) in enumerate(backends, start=1):
        body += f"    server node{i} 127.0.0.1:{dicom}"
        body += f" port {metrics}\n" if check == "http" else "\n"
    header = f"""
global
    maxconn 2000
    stats socket {stats} mode 600 level admin
    log stdout format raw local0
"""
    return header + body


def start_balancer(tmp: Path, backends: list[tuple[int, int]], **options) -> Balancer:
    if not HAPROXY.exists():
        pytest.fail(f"HAProxy is not installed at {HAPROXY}: apt-get install haproxy")
    tmp.mkdir(parents=True, exist_ok=True)
    port, stats = free_port(), tmp / "admin.sock"
    config = tmp / "haproxy.cfg"
    config.write_text(balancer_config(port, backends, stats, **options))
    check = subprocess.run([str(HAPROXY), "-c", "-f", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = tmp / "haproxy.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(HAPROXY), "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT
        )
    wait_for_port(port, proc=proc)
    return Balancer(proc, port, stats, log)


@pytest.fixture
def balancers() -> Iterator[list[Balancer]]:
    started: list[Balancer] = []
    yield started
    for balancer in started:
        balancer.stop()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def associations(node: RunningNode) -> list[str]:
    return re.findall(r"association released: .*", node.log_text())


@dataclass
class Sender:
    """A modality: sends its instances a few per association through ``port`` and,
    when an association fails (refused, aborted, a failure status), opens a new one
    for what was not acknowledged, as modalities retry."""

    port: int
    datasets: list[Dataset]
    per_association: int = 5
    retry: bool = True
    acknowledged: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def run(self, deadline: float) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
        remaining = list(self.datasets)
        while remaining and time.monotonic() < deadline:
            batch, remaining = remaining[: self.per_association], remaining[self.per_association :]
            unsent = self._send(ae, batch)
            if unsent:
                if not self.retry:
                    return
                remaining = unsent + remaining
                time.sleep(0.2)

    def _send(self, ae: AE, batch: list[Dataset]) -> list[Dataset]:
        """Sends ``batch`` on one association; returns what was not acknowledged."""
        assoc = ae.associate("127.0.0.1", self.port, ae_title="TEST-NODE")
        if not assoc.is_established:
            self.failures.append("association " + ("rejected" if assoc.is_rejected else "failed"))
            return batch
        guarded(assoc)
        for i, ds in enumerate(batch):
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0x0000:
                self.failures.append(f"C-STORE answered {status and hex(status.Status)}")
                assoc.abort()
                return batch[i:]
            self.acknowledged.append(str(ds.SOPInstanceUID))
        assoc.release()
        return []


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a node's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def run_senders(senders: list[Sender], timeout: float = 120.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    threads = [threading.Thread(target=s.run, args=(deadline,), daemon=True) for s in senders]
    for thread in threads:
        thread.start()
    return threads


# ----------------------------------------------------------------------------- PROXY port


def v2_header(source: str, port: int) -> bytes:
    return ProxyProtocolV2().pack(
        ProxyResultIPv4((IPv4Address(source), port), (IPv4Address("127.0.0.1"), 11112))
    )


def store_one(sock: socket.socket, ds: Dataset) -> int | None:
    """One C-STORE on a connected socket (after whatever header it got); the status."""
    sock.sendall(rawscu.associate_rq(contexts=[(1, rawscu.CT_IMAGE_STORAGE, EXPLICIT_LE)]))
    reply = rawscu.read_pdu(sock)
    if reply is None or reply[0] != rawscu.A_ASSOCIATE_AC:
        return None
    assoc = rawscu.Association(sock, {1: True})
    result = rawscu.c_store(
        assoc, ds.SOPClassUID.encode(), ds.SOPInstanceUID.encode(), rawscu.encode(ds)
    )
    assoc.close()
    return None if result is None else result[0]


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


def closed_without_answer(sock: socket.socket) -> bool:
    """True if the node closes ``sock`` without sending a byte."""
    with contextlib.suppress(OSError):
        sock.sendall(rawscu.associate_rq())
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def test_proxy_port_takes_v1_v2_and_local_and_closes_the_rest(nodes, tmp_path: Path) -> None:
    rules = """
  - name: from-the-documentation-network
    match: { peer_address: 203.0.113.0/24 }
    send_to: [doc]
  - name: everything-else
    send_to: [archive]
"""
    doc = tmp_path / "doc"
    node = start_node(
        nodes,
        "n",
        """
        proxy_protocol: {trusted: [127.0.0.1], direct: [127.0.0.4]}
        allow: [{peer_address: [203.0.113.0/24, 198.51.100.0/24, 127.0.0.0/8]}]
        """,
        rules=rules,
        extra_destinations=f"doc: {{type: folder, path: {doc}}}\n",
    )
    first, second, third = small_cts(3)

    # No header: closed, and the log names the peer.
    sock = connect(node.port)
    local_port = sock.getsockname()[1]
    assert closed_without_answer(sock)
    node.wait_until(
        lambda: (
            f"connection from 127.0.0.1:{local_port} closed: no PROXY header" in node.log_text()
        ),
        10,
        "the missing header logged",
    )
    # A valid header, but from an address that is not trusted: refused.
    sock = connect(node.port, source="127.0.0.3")
    sock.sendall(v2_header("203.0.113.9", 999))
    assert closed_without_answer(sock)
    node.wait_until(
        lambda: re.search(r"connection from 127\.0\.0\.3:\d+ refused: not in", node.log_text()),
        10,
        "the untrusted peer logged",
    )
    # A malformed v1 line: closed.
    sock = connect(node.port)
    sock.sendall(b"PROXY TCP4 203.0.113.7 nonsense\r\n")
    assert closed_without_answer(sock)

    # v1: the header's address is the association's (rules, logs, spool).
    with connect(node.port) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 4242 11112\r\n")
        assert store_one(sock, first) == 0x0000
    # v2, from another network.
    with connect(node.port) as sock:
        sock.sendall(v2_header("198.51.100.9", 5151))
        assert store_one(sock, second) == 0x0000
    # From a `direct` address (a PACS calling back): no header, its own address.
    with connect(node.port, source="127.0.0.4") as sock:
        assert store_one(sock, third) == 0x0000
    node.wait_until(lambda: len(list(doc.rglob("*.dcm"))) == 1 and len(node.archived()) == 2)
    routed = pydicom.dcmread(next(doc.rglob("*.dcm")), stop_before_pixels=True)
    assert routed.SOPInstanceUID == first.SOPInstanceUID
    assert routed.file_meta.SendingPresentationAddress == "dicom://203.0.113.7:4242"
    senders = {
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.SendingPresentationAddress
        for p in node.archived()
    }
    assert {s.rsplit(":", 1)[0] for s in senders} == {"dicom://198.51.100.9", "dicom://127.0.0.4"}
    assert "dicom://198.51.100.9:5151" in senders
    log = node.log_text()
    assert "RAWSCU at 203.0.113.7:4242" in log and "RAWSCU at 198.51.100.9:5151" in log
    assert re.search(r"RAWSCU at 127\.0\.0\.4:\d+", log)

    # LOCAL (a health check): the connection goes on with its real address; one that
    # closes right after its header leaves no warning.
    before = log.count("WARNING")
    with connect(node.port) as sock:
        sock.sendall(ProxyProtocolV2().pack(ProxyResultLocal()))
    with connect(node.port) as sock:
        sock.sendall(ProxyProtocolV2().pack(ProxyResultLocal()))
        sock.sendall(rawscu.associate_rq(contexts=[(1, rawscu.VERIFICATION, EXPLICIT_LE)]))
        reply = rawscu.read_pdu(sock)
        assert reply is not None and reply[0] == rawscu.A_ASSOCIATE_AC
        rawscu.Association(sock, {}).close()
    with connect(node.port) as sock:  # v1's form of the same
        sock.sendall(b"PROXY UNKNOWN\r\n")
        assert store_one(sock, small_cts(1, seed=7)[0]) == 0x0000
    time.sleep(0.3)
    assert node.log_text().count("WARNING") == before, node.log_text()
    # ... as the balancer's own connection: its real address (logged at DEBUG only).
    node.wait_until(lambda: len(node.archived()) == 3, 30, "the UNKNOWN one archived")
    addresses = [
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.SendingPresentationAddress
        for p in node.archived()
    ]
    assert sum(a.startswith("dicom://127.0.0.1:") for a in addresses) == 1
    assert node.proc.poll() is None


def test_proxy_header_comes_before_tls(nodes, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    tls_port = free_port()
    node = start_node(
        nodes,
        "n",
        f"""
        proxy_protocol: {{trusted: [127.0.0.1]}}
        tls:
          port: {tls_port}
          certificate: {certs["server.crt"]}
          private_key: {certs["server.key"]}
        """,
    )
    wait_for_port(tls_port)
    context = ssl.create_default_context(cafile=str(certs["ca.crt"]))
    raw = connect(tls_port)
    raw.sendall(v2_header("192.0.2.77", 7777))
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert store_one(sock, small_cts(1)[0]) == 0x0000
    node.wait_archived(1)
    assert "RAWSCU at 192.0.2.77:7777" in node.log_text()
    # A TLS client without the header is closed before any handshake.
    raw = connect(tls_port)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(raw, server_hostname="127.0.0.1")
    raw.close()


def test_healthz_ignores_early_resets_and_follows_dicom_node_drain(nodes, tmp_path: Path) -> None:
    metrics = free_port()
    node = start_node(
        nodes,
        "n",
        f"""
        metrics: {{host: 127.0.0.1, port: {metrics}}}
        drain_seconds: 1s
        proxy_protocol: {{trusted: [127.0.0.6], direct: [127.0.0.1]}}
        """,
    )
    wait_for_port(metrics)
    for request in (b"", b"GET /hea", b"GET /healthz HTTP/1.0\r\n\r\n") * 3:
        sock = socket.create_connection(("127.0.0.1", metrics))
        sock.sendall(request)
        # SO_LINGER 0: close with a reset, as HAProxy's checks do.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert get(metrics, "/healthz") == (200, "ok\n")

    def drain(*extra: str) -> str:
        command = [sys.executable, "-m", "node.cli", "drain", "--config", str(node.config)]
        done = subprocess.run([*command, *extra], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"node {node.proc.pid}" in drain()
    node.wait_until(lambda: get(metrics, "/healthz") == (503, "draining\n"), 10, "503")
    assert store_one_direct(node.port)  # draining, the node still serves associations
    assert not balancer_check_accepted(node.port)  # but fails a DICOM-level check
    drain("--cancel")
    node.wait_until(lambda: get(metrics, "/healthz") == (200, "ok\n"), 10, "ok again")
    assert balancer_check_accepted(node.port)
    # One spool, one node: a second one on the same spool does not start.
    second = subprocess.run(
        [sys.executable, "-m", "node.cli", "run", "--config", str(node.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert second.returncode == 2 and f"another dicom-node (PID {node.proc.pid}" in second.stderr
    assert node.stop(signal.SIGTERM) == 0
    log = node.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    no_node = subprocess.run(
        [sys.executable, "-m", "node.cli", "drain", "--config", str(node.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert no_node.returncode != 0 and "no node runs on spool" in no_node.stderr


def balancer_check_accepted(port: int) -> bool:
    """A DICOM-level health check from a balancer (PROXY LOCAL, then an A-ASSOCIATE-RQ)."""
    with connect(port, source="127.0.0.6") as sock:
        sock.sendall(ProxyProtocolV2().pack(ProxyResultLocal()))
        sock.sendall(rawscu.associate_rq(contexts=[(1, rawscu.VERIFICATION, EXPLICIT_LE)]))
        reply = rawscu.read_pdu(sock)
        if reply is not None:
            rawscu.Association(sock, {}).close()
        return reply is not None and reply[0] == rawscu.A_ASSOCIATE_AC


def store_one_direct(port: int) -> bool:
    with connect(port) as sock:
        return store_one(sock, small_cts(1, seed=99)[0]) == 0x0000


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{trusted: [10.0.0.0/8, nonsense]}", "node.proxy_protocol.trusted[1]: 'nonsense' is not"),
        ("{trusted: []}", "node.proxy_protocol.trusted: required"),
        ("{direct: [10.0.0.1]}", "node.proxy_protocol.trusted: required"),
        ("{trusted: [10.0.0.1], port: 1}", "node.proxy_protocol.port: unknown key"),
        ("{trusted: [10.0.0.0/8], direct: [10.1.2.3]}", "node.proxy_protocol.direct[0]: 10.1"),
        ("{trusted: [10.0.0.1], direct: 10.0.0.2}", "node.proxy_protocol.direct: expected a list"),
    ],
)
def test_proxy_protocol_config_errors_name_their_place(section: str, message: str) -> None:
    from node.config import parse_config
    from node.errors import ConfigError

    text = f"node: {{proxy_protocol: {section}}}\n" + (
        "destinations: {a: {type: folder, path: /x}}\nrules: [{send_to: [a]}]\n"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(text, Path("/"))


def test_drain_seconds_default_follows_what_can_watch_the_node() -> None:
    from node.config import parse_config

    def window(node: str) -> float:
        text = f"node: {node}\ndestinations: {{a: {{type: folder, path: /x}}}}\n"
        return parse_config(text + "rules: [{send_to: [a]}]\n", Path("/")).node.drain_window

    assert window("{}") == 0.0
    assert window("{metrics: {port: 9464}}") == 10.0
    assert window("{proxy_protocol: {trusted: [10.0.0.1]}}") == 10.0
    assert window("{metrics: {port: 9464}, drain_seconds: 0}") == 0.0
    assert window("{drain_seconds: 2m}") == 120.0


# ----------------------------------------------------------------------------- behind HAProxy


def two_proxied_nodes(
    nodes: NodeFactory, extra: str = "", trusted: str = "127.0.0.1"
) -> list[tuple[RunningNode, int]]:
    out = []
    for name in ("a", "b"):
        metrics = free_port()
        node = start_node(nodes, name, proxied_node_extra(metrics, trusted, extra))
        wait_for_port(metrics)
        out.append((node, metrics))
    return out


def test_two_nodes_behind_haproxy_archive_every_instance_once(
    nodes, balancers, tmp_path: Path
) -> None:
    pairs = two_proxied_nodes(nodes)
    balancer = start_balancer(tmp_path / "lb", [(n.port, m) for n, m in pairs])
    balancers.append(balancer)
    balancer.wait_status({"node1": "UP", "node2": "UP"})
    sources = small_cts(300)
    folders = [write_all(sources[i::6], tmp_path / f"send{i}") for i in range(6)]
    with_threads = [
        threading.Thread(target=storescu, args=(balancer.port, files)) for files in folders
    ]
    for thread in with_threads:
        thread.start()
    for thread in with_threads:
        thread.join(180)
    (a, _), (b, _) = pairs
    expected = sorted(str(ds.SOPInstanceUID) for ds in sources)
    a.wait_until(lambda: len(archived_uids(a, b)) >= 300, 120, "300 archived")
    assert sorted(archived_uids(a, b)) == expected  # every one, exactly once
    assert associations(a) and associations(b)  # both nodes served
    assert len(associations(a)) + len(associations(b)) == 6
    # HAProxy's /healthz checks (every 300 ms, reset by HAProxy) left no error.
    for node in (a, b):
        assert "Traceback" not in node.log_text() and "ERROR" not in node.log_text()


def test_allow_list_sees_the_modalities_addresses_through_haproxy_with_a_dicom_check(
    nodes, balancers, tmp_path: Path
) -> None:
    """Uses the template's DICOM-level check (A-ASSOCIATE-RQ, expect an AC)."""
    allow = """
        allow:
          - { peer_address: 127.0.0.2 }
          - { calling_ae_title: HAPROXY-CHECK, peer_address: 127.0.0.1 }
        """
    pairs = two_proxied_nodes(nodes, allow)
    balancer = start_balancer(tmp_path / "lb", [(n.port, m) for n, m in pairs], check="dicom")
    balancers.append(balancer)
    balancer.wait_status({"node1": "UP", "node2": "UP"})
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    for _ in range(2):  # leastconn with no open association: try both nodes
        allowed = guarded(
            ae.associate(
                "127.0.0.1", balancer.port, ae_title="TEST-NODE", bind_address=("127.0.0.2", 0)
            )
        )
        assert allowed.is_established
        assert allowed.send_c_echo().Status == 0x0000
        allowed.release()
        refused = ae.associate(
            "127.0.0.1", balancer.port, ae_title="TEST-NODE", bind_address=("127.0.0.3", 0)
        )
        assert refused.is_rejected
        assert refused.acceptor.primitive.diagnostic == 0x03  # calling AE not recognised
    logs = "".join(node.log_text() for node, _ in pairs)
    assert re.search(r"SCANNER at 127\.0\.0\.2:\d+ -> TEST-NODE", logs)
    assert "caller 'SCANNER' at 127.0.0.3 is not in node.allow" in logs
    # The checks' own associations (several per second) are not logged at INFO.
    assert "HAPROXY-CHECK" not in logs


def test_a_node_killed_mid_run_loses_no_acknowledged_instance(
    nodes, balancers, tmp_path: Path
) -> None:
    pairs = two_proxied_nodes(nodes)
    (a, a_metrics), (b, _) = pairs
    balancer = start_balancer(tmp_path / "lb", [(n.port, m) for n, m in pairs])
    balancers.append(balancer)
    balancer.wait_status({"node1": "UP", "node2": "UP"})
    sources = small_cts(300)
    senders = [Sender(balancer.port, sources[i::6]) for i in range(6)]
    threads = run_senders(senders)
    deadline = time.monotonic() + 60
    while len(a.archived()) < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    # The machine dies with work in its spool: its workers stop first, so that
    # acknowledged instances pile up unrouted, then everything is killed.
    workers = children(a.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    incoming = a.spool / "incoming"
    a.wait_until(lambda: len(list(incoming.glob("*.dcm"))) >= 10, 60, "a backlog")
    for pid in [a.proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    a.proc.wait()
    left_in_spool = len(list(incoming.glob("*.dcm")))
    assert left_in_spool >= 10
    for thread in threads:
        thread.join(150)
    acknowledged = {uid for s in senders for uid in s.acknowledged}
    assert len(acknowledged) == 300, [s.failures for s in senders]
    # Associations in progress on the killed node were cut (when there were any at that
    # moment; HAProxy redispatches new ones): the senders sent those instances again.
    print(f"sender failures seen: {sum(len(s.failures) for s in senders)}")
    # Restarted on its spool, the killed node finishes what it had acknowledged.
    restarted = nodes.start(a.config.read_text(), root=a.root, port=a.port)
    wait_for_port(a_metrics)
    for node in (restarted, b):
        node.wait_spool_empty(60)
    assert acknowledged <= set(archived_uids(restarted, b))


def test_sigterm_drains_a_node_behind_haproxy_without_refusing_anyone(
    nodes, balancers, tmp_path: Path
) -> None:
    """HAProxy here does not retry refused connections: only the drain keeps them away."""
    pairs = two_proxied_nodes(nodes, "drain_seconds: 5s")
    (a, a_metrics), (b, _) = pairs
    balancer = start_balancer(
        tmp_path / "lb",
        [(n.port, m) for n, m in pairs],
        retries=False,
        timing="inter 1s fall 2 rise 1",  # out of the pool 1-2 s after the SIGTERM
    )
    balancers.append(balancer)
    balancer.wait_status({"node1": "UP", "node2": "UP"})
    sources = small_cts(240)
    senders = [
        Sender(balancer.port, sources[i::4], per_association=3, retry=False) for i in range(4)
    ]
    threads = run_senders(senders)
    while len(associations(a)) < 4:
        time.sleep(0.02)
    a.proc.send_signal(signal.SIGTERM)
    # 503 as soon as the node has handled the signal (its main thread may need a moment
    # on a busy machine), well before its listener closes.
    a.wait_until(lambda: get(a_metrics, "/healthz") == (503, "draining\n"), 2, "503")
    sent_at_sigterm = sum(len(s.acknowledged) for s in senders)
    assert a.proc.wait(60) == 0
    for thread in threads:
        thread.join(120)
    assert [f for s in senders for f in s.failures] == []  # nothing refused or aborted
    assert sum(len(s.acknowledged) for s in senders) == 240
    assert sent_at_sigterm < 240  # the run went on after the SIGTERM...
    b_after = b.log_text()
    assert len(associations(b)) > 0 and "draining" in a.log_text()
    assert balancer.servers()["node1"]["status"].startswith("DOWN")
    b.wait_spool_empty()
    # Every instance archived once, or acknowledged by the drained node and kept in its
    # spool for its next start (a stop leaves queued work there).
    kept = [
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in (a.spool / "incoming").glob("*.dcm")
    ]
    assert sorted(archived_uids(a, b) + kept) == sorted(str(ds.SOPInstanceUID) for ds in sources)
    assert "Traceback" not in a.log_text() + b_after


# ----------------------------------------------------------------------------- commitment


def test_storage_commitment_from_two_nodes_to_one_orthanc(nodes, tmp_path: Path) -> None:
    """The cluster layout of docs/cluster.md: one AE title for the modalities, each node
    its own calling AE title towards the PACS, which calls it back on the node's own
    address (a `direct` caller: no PROXY header), not through the balancer."""
    from tests.orthanc import start_orthanc

    ports = {"NODE-A": free_port(), "NODE-B": free_port()}
    modalities = {title.lower(): [title, "127.0.0.1", port] for title, port in ports.items()}
    orthanc = start_orthanc(tmp_path / "orthanc", extra={"DicomModalities": modalities})
    try:
        started = [
            start_node(
                nodes,
                title.lower(),
                "proxy_protocol: {trusted: [127.0.0.5], direct: [127.0.0.1]}",
                port=port,
                rules="""
  - name: to-the-pacs
    send_to: [pacs]
""",
                extra_destinations=dicom_destination(
                    "pacs",
                    orthanc.dicom_port,
                    orthanc.aet,
                    f"storage_commitment: true\n  calling_ae_title: {title}",
                ),
            )
            for title, port in ports.items()
        ]
        sources = small_cts(6, seed=50)
        for i, node in enumerate(started):
            storescu(node.port, write_all(sources[i * 3 : i * 3 + 3], tmp_path / f"send{i}"))

        def committed(node: RunningNode) -> list[tuple[str, str]]:
            return re.findall(r"(\d+) of (\d+) instance\(s\) committed", node.log_text())

        for node in started:
            node.wait_until(
                lambda n=node: sum(int(a) for a, _ in committed(n)) >= 3, 90, "3 committed"
            )
            node.wait_spool_empty()
            node.wait_until(lambda n=node: not outbox_files(n.spool, "pacs"), 30, "no outbox")
            log = node.log_text()
            assert sum(int(a) for a, _ in committed(node)) == 3, log
            assert all(a == b for a, b in committed(node))
            # Each report reached the node that asked, on its own port.
            assert "unknown transaction" not in log and "ORTHANC at 127.0.0.1" in log
        assert {str(ds.SOPInstanceUID) for ds in sources} <= set(orthanc.sop_instance_uids())
    finally:
        orthanc.stop()
