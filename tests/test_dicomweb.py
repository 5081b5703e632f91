"""The dicomweb (STOW-RS) destination: a real Orthanc with its DICOMweb plugin, and a
scripted HTTP archive (stdlib http.server in a thread) for what Orthanc will not do:
partial failures, per-instance reasons, 400/413/503/401, resets and silence.

In every scripted case the end state is checked the same way: each instance was
either stored by the archive or is in ``failed/`` with its reason, never both, and
nothing is left pending or in ``failed/`` twice.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless

from node.codecs import compress_dataset
from node.codecs.base import CompressSpec
from node.config import RetryPolicy, load_config
from node.destinations.dicomweb import (
    DicomwebRunner,
    HeldCollector,
    Verdict,
    parse_store_response,
    reason_verdict,
    retry_after,
)
from node.destinations.dicomweb_config import AuthKind, DicomwebAuth, DicomwebDestination, HttpTls
from node.errors import ConfigError
from node.outbox import Outbox
from node.spool import Spool
from tests import images
from tests.conftest import ROOT, default_config, storescu
from tests.orthanc import Orthanc, start_orthanc

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
FAST_RETRY = RetryPolicy(initial=0.1, max=0.5, give_up_after=3600)
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


# ----------------------------------------------------------------------------- archive


@dataclass
class Seen:
    """One STOW-RS request as the scripted archive received it."""

    number: int
    uids: list[str]
    syntaxes: list[str]
    authorization: str
    at: float


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def stored_answer(stored: list[str], failed: dict[str, int] | None = None) -> dict[str, Any]:
    """A Store Instances Response (PS3.18 10.5.3) in DICOM JSON."""

    def ref(uid: str) -> dict[str, Any]:
        return {"00081155": {"vr": "UI", "Value": [uid]}}

    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [ref(u) for u in stored]}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {**ref(u), "00081197": {"vr": "US", "Value": [r]}} for u, r in failed.items()
            ],
        }
    return body


class Archive:
    """A scripted STOW-RS archive. ``script(archive, seen)`` answers each request; by
    default every instance is stored. ``reset`` and ``hang`` name request numbers to
    cut mid-body (TCP RST) or to leave unanswered."""

    def __init__(
        self,
        script: Callable[[Archive, Seen], Answer] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.script = script or (lambda archive, seen: archive.store(seen.uids))
        self.requests: list[Seen] = []
        self.stored: list[str] = []
        self.reset: set[int] = set()
        self.hang: set[int] = set()
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.token_requests: list[bytes] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def store(
        self, uids: list[str], failed: dict[str, int] | None = None, status: int = 200
    ) -> Answer:
        with self.lock:
            self.stored += uids
        body = json.dumps(stored_answer(uids, failed)).encode()
        return Answer(status, body, {"Content-Type": "application/dicom+json"})

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        archive = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                length = int(self.headers["Content-Length"])
                if self.path == "/token":  # an OAuth token endpoint, for google-auth
                    archive.token_requests.append(self.rfile.read(length))
                    body = json.dumps({"access_token": "ya29.test", "expires_in": 3600}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                with archive.lock:
                    number = archive._next_number()
                if number in archive.reset:
                    self.rfile.read(min(length, 5000))
                    # SO_LINGER 0: close() sends a RST, mid-body from the sender's view.
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    self.close_connection = True
                    return
                body = self.rfile.read(length)
                seen = parse_request(number, self.headers, body)
                with archive.lock:
                    archive.requests.append(seen)
                if number in archive.hang:
                    archive.released.wait(120)
                    self.close_connection = True
                    return
                answer = archive.script(archive, seen)
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def do_GET(self) -> None:  # noqa: N802 - QIDO-RS for `dicom-node echo`
                # The script judges the credentials; an empty study list otherwise.
                seen = Seen(0, [], [], self.headers.get("Authorization", ""), time.monotonic())
                status = archive.script(archive, seen).status
                body = b"[]" if status < 400 else b""
                self.send_response(200 if status < 400 else status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    _count = 0

    def _next_number(self) -> int:
        self._count += 1
        return self._count


def parse_request(number: int, headers: Any, body: bytes) -> Seen:
    """The instances of a multipart/related request, checked for the form STOW-RS asks."""
    ctype = headers["Content-Type"]
    assert ctype.startswith('multipart/related; type="application/dicom"'), ctype
    assert headers["Accept"] == "application/dicom+json"
    boundary = ctype.split("boundary=")[1].strip('"').encode()
    chunks = body.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n", "malformed multipart framing"
    uids, syntaxes = [], []
    for chunk in chunks[1:-1]:
        head, _, content = chunk[2:].partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in head
        content = content[:-2]  # the CRLF before the next delimiter
        assert f"Content-Length: {len(content)}".encode() in head
        ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True)
        uids.append(str(ds.SOPInstanceUID))
        syntaxes.append(str(ds.file_meta.TransferSyntaxUID))
    return Seen(number, uids, syntaxes, headers.get("Authorization", ""), time.monotonic())


@pytest.fixture
def archives() -> Iterator[list[Archive]]:
    started: list[Archive] = []
    yield started
    for archive in started:
        archive.close()


# ----------------------------------------------------------------------------- outbox helpers


def fill_outbox(spool: Spool, name: str, datasets: list[Dataset]) -> list[str]:
    pending = spool.pending_dir(name)
    pending.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.save_as(pending / f"{time.time_ns()}-0-{i:06d}.dcm", enforce_file_format=True)
    return [str(ds.SOPInstanceUID) for ds in datasets]


def small_cts(n: int, seed: int = 0) -> list[Dataset]:
    return [images.make_ct(rows=16, cols=16, seed=seed + i) for i in range(n)]


def destination(url: str, **kw: Any) -> DicomwebDestination:
    kw.setdefault("retry", FAST_RETRY)
    kw.setdefault("timeout", 5.0)
    return DicomwebDestination(name="cloud", url=url, **kw)


def drain(dest: DicomwebDestination, spool: Spool, timeout: float = 30.0) -> DicomwebRunner:
    """Run the destination until its pending/ is empty."""
    runner = DicomwebRunner(dest, spool)
    runner.start()
    deadline = time.monotonic() + timeout
    try:
        while any(spool.pending_dir(dest.name).glob("*.dcm")):
            assert time.monotonic() < deadline, "pending/ did not drain"
            time.sleep(0.05)
    finally:
        runner.stop(timeout=10)
    return runner


def assert_settled(
    spool: Spool, archive: Archive, uids: list[str], failed: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """Every instance stored once or in failed/ once (with the expected reason text)."""
    failed = failed or {}
    outbox = Outbox(spool, "cloud")
    assert not outbox.pending_ids()
    infos = [item.info for item in outbox.list_failed()]
    by_uid = {info["sop_instance_uid"]: info for info in infos}
    assert len(by_uid) == len(infos), "an instance is in failed/ twice"
    assert set(by_uid) == set(failed)
    for uid, text in failed.items():
        assert text in f"{by_uid[uid]['status']} {by_uid[uid]['error']}", by_uid[uid]
    assert set(archive.stored) == set(uids) - set(failed)
    assert not set(archive.stored) & set(failed)
    return by_uid


# ----------------------------------------------------------------------------- units


def test_failure_reasons_follow_ps3_18_table_i_2_2() -> None:
    assert reason_verdict(0xA700) is Verdict.TRANSIENT
    assert reason_verdict(0xA7FF) is Verdict.TRANSIENT
    assert reason_verdict(0x0110) is Verdict.TRANSIENT
    assert reason_verdict(0xA900) is Verdict.PERMANENT
    assert reason_verdict(0xC000) is Verdict.PERMANENT
    assert reason_verdict(0x0122) is Verdict.PERMANENT
    assert reason_verdict(0xC122) is Verdict.DECOMPRESS
    assert reason_verdict(45070) is Verdict.DELIVERED  # Azure: already stored
    assert reason_verdict(45071) is Verdict.TRANSIENT  # Azure: being stored
    report = parse_store_response(json.dumps(stored_answer(["1.2"], {"1.3": 0xA900})).encode())
    assert report is not None
    assert report.stored == {"1.2": None} and report.failed == {"1.3": 0xA900}
    assert parse_store_response(b"<xml/>") is None
    assert retry_after("7", 0.0) == 7.0
    assert retry_after("Thu, 01 Jan 1970 00:00:10 GMT", 4.0) == 6.0
    assert retry_after("soon", 0.0) is None


def test_check_config_names_the_place_of_each_new_key(tmp_path: Path) -> None:
    def load(body: str) -> None:
        text = default_config(tmp_path, 11112, extra_destinations=body)
        path = tmp_path / "node.yaml"
        path.write_text(text)
        load_config(path)

    base = "cloud:\n  type: dicomweb\n  url: https://archive.example.org/dicom-web\n"
    load(base)
    cases = {
        "  max_request_size: 10\n": "destinations.cloud.max_request_size: must be at least",
        "  max_request_size: lots\n": "destinations.cloud.max_request_size: 'lots' is not a size",
        "  max_instances_per_request: 0\n": "destinations.cloud.max_instances_per_request:",
        "  timeout: never\n": "destinations.cloud.timeout:",
        "  fallback: maybe\n": "destinations.cloud.fallback:",
        "  auth: {type: kerberos}\n": "destinations.cloud.auth.type: 'kerberos' is not one of",
        "  auth: {type: basic, username: u}\n": "destinations.cloud.auth.password_file: required",
        "  auth: {type: bearer}\n": "destinations.cloud.auth: give exactly one of",
        "  auth: {type: bearer, token_file: nowhere}\n": "destinations.cloud.auth.token_file:",
        "  tls: {certificate: c.pem}\n": "destinations.cloud.tls: give both",
        "  colour: blue\n": "destinations.cloud.colour: unknown key",
    }
    for extra, message in cases.items():
        with pytest.raises(ConfigError) as caught:
            load(base + extra)
        assert message in str(caught.value), (extra, str(caught.value))
    with pytest.raises(ConfigError, match=r"destinations\.cloud\.url: expected an http"):
        load("cloud:\n  type: dicomweb\n  url: ftp://x\n")
    shown = subprocess.run(
        [sys.executable, "-m", "node.cli", "check-config", str(tmp_path / "node.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert shown.returncode == 1  # the last, bad config (an ftp URL)
    assert shown.stderr.startswith("dicom-node: destinations.cloud.url: expected an http")
    (tmp_path / "node.yaml").write_text(default_config(tmp_path, 11112, extra_destinations=base))
    shown = subprocess.run(
        [sys.executable, "-m", "node.cli", "check-config", str(tmp_path / "node.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "cloud: dicomweb https://archive.example.org/dicom-web (no auth" in shown.stdout


# ----------------------------------------------------------------------------- scripted archive


def test_202_leaves_only_the_failed_instances(tmp_path: Path, archives: list[Archive]) -> None:
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(7))
    bad = {uids[1]: 0xA900, uids[5]: 0xC000}
    already = uids[3]  # Azure's 45070: the archive holds it already, so it is delivered

    def script(archive: Archive, seen: Seen) -> Answer:
        good = [u for u in seen.uids if u not in bad and u != already]
        failed = {u: bad[u] for u in seen.uids if u in bad}
        if already in seen.uids:
            failed[already] = 45070
            archive.stored.append(already)
        return archive.store(good, failed, status=202 if failed else 200)

    archive = Archive(script)
    archives.append(archive)
    drain(destination(archive.url, max_instances_per_request=4), spool)
    infos = assert_settled(spool, archive, uids, {uids[1]: "0xA900", uids[5]: "0xC000"})
    assert infos[uids[1]]["reason"] == "permanent failure"
    assert sorted(archive.stored) == sorted(set(uids) - set(bad))  # each stored once
    # Batches of at most 4, spread over the two parallel requests (how the 7 are split
    # depends on which request thread claims first: [4, 3] or [4, 2, 1]).
    sizes = [len(r.uids) for r in archive.requests]
    assert max(sizes) == 4 and sum(sizes) == 7 and len(sizes) >= 2, sizes


def test_409_transient_reasons_retried_permanent_to_failed(
    tmp_path: Path, archives: list[Archive]
) -> None:
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(3))
    busy, broken, flaky = uids
    answered: dict[str, int] = {}

    def script(archive: Archive, seen: Seen) -> Answer:
        failed = {}
        for uid in seen.uids:
            answered[uid] = answered.get(uid, 0) + 1
            if uid == broken:
                failed[uid] = 0xC000
            elif answered[uid] == 1:
                failed[uid] = 0xA700 if uid == busy else 0x0110
        if failed:  # 409: nothing of the request was stored
            return archive.store([], {u: failed.get(u, 0xA700) for u in seen.uids}, status=409)
        return archive.store(seen.uids)

    archive = Archive(script)
    archives.append(archive)
    drain(destination(archive.url), spool)
    assert_settled(spool, archive, uids, {broken: "0xC000"})
    assert answered[busy] >= 2 and answered[flaky] >= 2 and answered[broken] == 1


def test_400_batch_is_split_to_find_the_bad_instance(
    tmp_path: Path, archives: list[Archive]
) -> None:
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(8))
    bad = uids[6]

    def script(archive: Archive, seen: Seen) -> Answer:
        if bad in seen.uids:
            return Answer(400, b"bad multipart part", {"Content-Type": "text/plain"})
        return archive.store(seen.uids)

    archive = Archive(script)
    archives.append(archive)
    drain(destination(archive.url, max_instances_per_request=8, max_parallel_requests=1), spool)
    assert_settled(spool, archive, uids, {bad: "HTTP 400 Bad Request: bad multipart part"})
    assert sorted(archive.stored) == sorted(set(uids) - {bad})
    assert [len(r.uids) for r in archive.requests] == [8, 4, 4, 2, 2, 1, 1]


def test_503_retry_after_is_honoured(tmp_path: Path, archives: list[Archive]) -> None:
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(3))

    def script(archive: Archive, seen: Seen) -> Answer:
        if seen.number == 1:
            return Answer(503, b"maintenance", {"Retry-After": "2"})
        return archive.store(seen.uids)

    archive = Archive(script)
    archives.append(archive)
    drain(destination(archive.url, max_parallel_requests=1), spool)
    assert_settled(spool, archive, uids)
    first, second = archive.requests[0], archive.requests[1]
    # The retry policy alone would retry within 0.1-0.5 s.
    assert second.at - first.at >= 1.9


def test_an_archive_down_past_give_up_after_moves_instances_to_failed(
    tmp_path: Path, archives: list[Archive]
) -> None:
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(3))
    archive = Archive(lambda archive, seen: Answer(503, b"down for good"))
    archives.append(archive)
    retry = RetryPolicy(initial=0.1, max=0.3, give_up_after=1.0)
    drain(destination(archive.url, retry=retry), spool)
    infos = assert_settled(spool, archive, uids, dict.fromkeys(uids, "HTTP 503"))
    assert {info["reason"] for info in infos.values()} == {"gave up retrying"}
    assert all("archive unavailable since" in info["error"] for info in infos.values())


def test_413_halves_the_batch(tmp_path: Path, archives: list[Archive]) -> None:
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(8))

    def script(archive: Archive, seen: Seen) -> Answer:
        if len(seen.uids) > 2:
            return Answer(413, b"too large")
        return archive.store(seen.uids)

    archive = Archive(script)
    archives.append(archive)
    drain(destination(archive.url, max_instances_per_request=8, max_parallel_requests=1), spool)
    assert_settled(spool, archive, uids)
    assert sorted(archive.stored) == sorted(uids)
    assert [len(r.uids) for r in archive.requests] == [8, 4, 2, 2, 4, 2, 2]


def test_401_then_success_with_a_new_token_from_the_command(
    tmp_path: Path, archives: list[Archive]
) -> None:
    counter = tmp_path / "count"
    counter.write_text("0")
    issuer = tmp_path / "issue_token.py"
    issuer.write_text(
        "import sys, pathlib\n"
        "p = pathlib.Path(sys.argv[1]); n = int(p.read_text()) + 1; p.write_text(str(n))\n"
        "print(f'token-{n}')\n"
    )
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(4))

    def script(archive: Archive, seen: Seen) -> Answer:
        if seen.authorization != "Bearer token-2":
            return Answer(401, b"token expired")
        return archive.store(seen.uids)

    archive = Archive(script)
    archives.append(archive)
    auth = DicomwebAuth(AuthKind.BEARER, token_command=f"{sys.executable} {issuer} {counter}")
    drain(destination(archive.url, auth=auth, max_parallel_requests=1), spool)
    assert_settled(spool, archive, uids)
    assert counter.read_text() == "2"
    assert [r.authorization for r in archive.requests] == ["Bearer token-1", "Bearer token-2"]
    assert not (spool.pending_dir("cloud").parent / "held.json").exists()


def test_refused_credentials_hold_the_destination_without_failing_anything(
    tmp_path: Path, archives: list[Archive]
) -> None:
    token = tmp_path / "token"
    token.write_text("wrong\n")
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(3))

    def script(archive: Archive, seen: Seen) -> Answer:
        if seen.authorization != "Bearer right":
            return Answer(403, b"forbidden")
        return archive.store(seen.uids)

    archive = Archive(script)
    archives.append(archive)
    auth = DicomwebAuth(AuthKind.BEARER, token_file=token)
    dest = destination(archive.url, auth=auth, max_parallel_requests=1)
    runner = DicomwebRunner(dest, spool)
    runner.start()
    try:
        held = spool.pending_dir("cloud").parent / "held.json"
        deadline = time.monotonic() + 10
        while not held.exists():
            assert time.monotonic() < deadline, "not held"
            time.sleep(0.05)
        time.sleep(1.0)  # several backoff rounds: still nothing may fail
        outbox = Outbox(spool, "cloud")
        assert len(outbox.pending_ids()) == 3 and not outbox.failed_ids()
        config = tmp_path / "node.yaml"
        config.write_text(
            f"node: {{spool: {spool.root}}}\n"
            f"destinations:\n  cloud: {{type: dicomweb, url: '{archive.url}', "
            f"auth: {{type: bearer, token_file: {token}}}}}\n"
            "rules: [{send_to: cloud}]\n"
        )
        shown = subprocess.run(
            [sys.executable, "-m", "node.cli", "queue", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert "3 pending" in shown.stdout and "HELD: the archive refuses" in shown.stdout
        gauge = next(iter(HeldCollector(spool, lambda: ["cloud"]).collect()))
        assert [s.value for s in gauge.samples] == [1]
        token.write_text("right\n")  # the operator fixes the credentials
        deadline = time.monotonic() + 15
        while outbox.pending_ids():
            assert time.monotonic() < deadline, "not delivered after the fix"
            time.sleep(0.05)
        assert not held.exists()
        gauge = next(iter(HeldCollector(spool, lambda: ["cloud"]).collect()))
        assert [s.value for s in gauge.samples] == [0]
    finally:
        runner.stop(timeout=10)
    assert_settled(spool, archive, uids)


def test_connection_reset_mid_body_is_retried(tmp_path: Path, archives: list[Archive]) -> None:
    spool = Spool(tmp_path / "spool")
    # Large enough that the reset comes while the body is still being written.
    uids = fill_outbox(spool, "cloud", [images.make_ct(seed=i) for i in range(4)])
    archive = Archive()
    archive.reset = {1}
    archives.append(archive)
    drain(destination(archive.url, max_parallel_requests=1), spool)
    assert_settled(spool, archive, uids)
    assert sorted(archive.stored) == sorted(uids)


def test_an_archive_that_never_answers_times_out_and_is_retried(
    tmp_path: Path, archives: list[Archive]
) -> None:
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(3))
    archive = Archive()
    archive.hang = {1}
    archives.append(archive)
    started = time.monotonic()
    drain(destination(archive.url, timeout=1.0, max_parallel_requests=1), spool)
    assert time.monotonic() - started >= 1.0
    assert_settled(spool, archive, uids)
    assert len(archive.requests) == 2


def test_c122_and_415_are_resent_decompressed_with_the_same_uid(
    tmp_path: Path, archives: list[Archive]
) -> None:
    spool = Spool(tmp_path / "spool")
    sources = [images.make_ct(rows=32, cols=32, seed=i) for i in range(3)]
    compressed = [
        compress_dataset(ds, CompressSpec(transfer_syntax=JPEGLSLossless)).dataset for ds in sources
    ]
    uids = fill_outbox(spool, "cloud", compressed)
    received: dict[str, list[str]] = {}

    def script(archive: Archive, seen: Seen) -> Answer:
        for uid, ts in zip(seen.uids, seen.syntaxes, strict=True):
            received.setdefault(uid, []).append(ts)
        if seen.number == 1:
            return Answer(415, b"only uncompressed")
        plain = [
            u for u, ts in zip(seen.uids, seen.syntaxes, strict=True) if ts != JPEG_LS_LOSSLESS
        ]
        refused = {u: 0xC122 for u in seen.uids if u not in plain}
        return archive.store(plain, refused, status=202 if refused else 200)

    archive = Archive(script)
    archives.append(archive)
    drain(destination(archive.url, max_parallel_requests=1), spool)
    assert_settled(spool, archive, uids)
    for uid in uids:
        assert received[uid] == [JPEG_LS_LOSSLESS, "1.2.840.10008.1.2.1"]
    # fallback: fail sends nothing decompressed: C122 is final.
    spool2 = Spool(tmp_path / "spool2")
    uids2 = fill_outbox(spool2, "cloud", compressed[:1])
    strict = Archive(lambda a, s: a.store([], dict.fromkeys(s.uids, 49442), status=409))
    archives.append(strict)
    drain(destination(strict.url, fallback="fail"), spool2)
    assert_settled(spool2, strict, uids2, {uids2[0]: "0xC122"})


# ----------------------------------------------------------------------------- real node


def dicomweb_yaml(url: str, extra: str = "") -> str:
    return f"""
cloud:
  type: dicomweb
  url: {url}
  max_instances_per_request: 4
  timeout: 5s
  retry: {{initial: 0.2s, max: 1s}}
  {extra}
"""


@pytest.fixture(scope="module")
def orthanc_web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.fail(f"{DICOMWEB_PLUGIN} missing: apt-get install orthanc-dicomweb (see .ci/run)")
    server = start_orthanc(
        tmp_path_factory.mktemp("orthanc-web"),
        extra={
            "SyncStorageArea": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        },
    )
    yield server
    server.stop()


def test_fan_out_to_orthanc_dicomweb_and_folder_bit_exact(
    nodes, orthanc_web: Orthanc, tmp_path: Path
) -> None:
    rules = """
      - name: everything
        compress: { transfer_syntax: jpeg-ls-lossless }
        send_to: [archive, cloud]
    """
    node = nodes.start(
        rules=rules, extra_destinations=dicomweb_yaml(f"{orthanc_web.url}/dicom-web")
    )
    sources = [images.make_ct(rows=128, cols=128, seed=i) for i in range(5)]
    sources += [images.make_rgb(seed=7), images.make_multiframe(frames=6, seed=8)]
    folder = tmp_path / "send"
    folder.mkdir()
    paths = []
    for i, ds in enumerate(sources):
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    storescu(node.port, paths)
    node.wait_archived(len(sources))
    uids = {str(s.SOPInstanceUID) for s in sources}
    node.wait_until(lambda: uids <= set(orthanc_web.sop_instance_uids()), 30, "all in Orthanc")
    node.wait_until(lambda: not list((node.spool / "destinations/cloud/pending").glob("*.dcm")))
    stored = orthanc_web.sop_instance_uids()
    for path in node.archived():
        ds = pydicom.dcmread(path)
        uid = str(ds.SOPInstanceUID)
        assert ds.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
        # The folder's copy and the archive's are the same bytes: what STOW-RS carried.
        assert orthanc_web.get(f"/instances/{stored[uid]}/file") == path.read_bytes()
        source = next(s for s in sources if str(s.SOPInstanceUID) == uid)
        np.testing.assert_array_equal(ds.pixel_array, source.pixel_array)
    config = str(node.config)
    echoed = subprocess.run(
        [sys.executable, "-m", "node.cli", "echo", "cloud", "--config", config],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert echoed.returncode == 0, echoed.stderr
    assert "answered HTTP 200" in echoed.stdout and "URL works" in echoed.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "node.cli", "queue", "--config", config],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert "cloud (dicomweb " in shown.stdout and "0 pending, 0 retrying, 0 failed" in shown.stdout


def test_echo_says_what_does_not_work(tmp_path: Path, archives: list[Archive]) -> None:
    def echo(body: str) -> subprocess.CompletedProcess[str]:
        config = tmp_path / "node.yaml"
        config.write_text(default_config(tmp_path, 11112, extra_destinations=body))
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "echo", "cloud", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    refused = echo(dicomweb_yaml(f"http://127.0.0.1:{dead}/dicom-web"))
    assert refused.returncode == 4 and "cannot connect to" in refused.stderr
    archive = Archive()
    archives.append(archive)
    ok = echo(dicomweb_yaml(archive.url))
    assert ok.returncode == 0 and "answered HTTP 200" in ok.stdout, ok.stderr
    tls = echo(dicomweb_yaml(archive.url.replace("http:", "https:")))
    assert tls.returncode == 4 and "TLS with" in tls.stderr, tls.stderr


def test_kill_9_mid_request_then_restart_delivers_everything(
    nodes, archives: list[Archive], tmp_path: Path
) -> None:
    archive = Archive()
    archive.hang = {1}  # the first request is read whole and never answered
    archives.append(archive)
    rules = "- name: all\n  send_to: [cloud]\n"
    node = nodes.start(rules=rules, extra_destinations=dicomweb_yaml(archive.url))
    sources = small_cts(10, seed=100)
    folder = tmp_path / "send"
    folder.mkdir()
    paths = []
    for i, ds in enumerate(sources):
        paths.append(folder / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    storescu(node.port, paths)  # all acknowledged

    def hung() -> list[str]:
        return next((r.uids for r in archive.requests if r.number == 1), [])

    node.wait_until(hung, 30, "a request in flight")
    node.proc.send_signal(signal.SIGKILL)  # while the archive holds that request
    node.proc.wait()
    assert not set(hung()) & set(archive.stored)
    archive.released.set()
    again = nodes.start(root=node.root, port=node.port, config_text=node.config.read_text())
    pending = again.spool / "destinations/cloud/pending"
    again.wait_until(lambda: not list(pending.glob("*.dcm")), 30, "empty outbox")
    again.wait_spool_empty()
    assert set(archive.stored) == {str(s.SOPInstanceUID) for s in sources}
    assert set(hung()) <= set(archive.stored)
    assert not list((again.spool / "destinations/cloud/failed").glob("*.dcm"))


# ----------------------------------------------------------------------------- memory


class Sink:
    """An archive that reads request bodies in chunks and discards them."""

    def __init__(self) -> None:
        self.received = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                left = int(self.headers["Content-Length"])
                while left:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        return
                    left -= len(chunk)
                    sink.received += len(chunk)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"


def write_sparse_multiframe(path: Path, pixel_bytes: int) -> None:
    """A multi-frame 16-bit instance of about ``pixel_bytes`` of Pixel Data, written
    sparse (the frames are a hole in the file: zeros, cheap to make and to read)."""
    ds = images.make_multiframe(frames=1, rows=1024, cols=1024)
    frames = max(1, pixel_bytes // (1024 * 1024 * 2))
    ds.NumberOfFrames = frames
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    length = frames * 1024 * 1024 * 2
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    with open(path, "wb") as f:
        f.write(buffer.getvalue() + header)
        f.truncate(f.tell() + length)


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


# The 1 GiB (sparse, so cheap to make; its time is in docs/decisions.md).
# DICOM_NODE_BIG_MB=200 makes it quicker on a slow machine.
BIG_MB = int(os.environ.get("DICOM_NODE_BIG_MB", "1024"))


def test_memory_a_large_multiframe_instance_is_streamed(nodes, tmp_path: Path) -> None:
    sink = Sink()
    try:
        rules = "- name: all\n  send_to: [cloud]\n"
        node = nodes.start(rules=rules, extra_destinations=dicomweb_yaml(sink.url))
        time.sleep(2.0)  # imports done, threads idle
        idle = status_kib(node.proc.pid, "VmRSS")
        Path(f"/proc/{node.proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
        pending = node.spool / "destinations/cloud/pending"
        staged = pending / ".big.tmp"
        write_sparse_multiframe(staged, BIG_MB * 1024 * 1024)
        size = staged.stat().st_size
        staged.rename(pending / f"{time.time_ns()}-0-big.dcm")
        node.wait_until(lambda: not list(pending.glob("*.dcm")), 300, "the big instance sent")
        peak = status_kib(node.proc.pid, "VmHWM")
        assert sink.received >= size
        assert not list((node.spool / "destinations/cloud/failed").glob("*.dcm"))
        grown_mb = (peak - idle) / 1024
        print(f"{size / 2**20:.0f} MiB instance: peak RSS {grown_mb:.1f} MB over idle")
        assert grown_mb < 300, f"peak RSS grew {grown_mb:.0f} MB sending {size} bytes"
    finally:
        sink.server.shutdown()
        sink.server.server_close()


# ----------------------------------------------------------------------------- auth and TLS


def test_https_with_a_private_ca_a_client_certificate_and_basic_auth(
    tmp_path: Path, archives: list[Archive]
) -> None:
    from tests.test_operations import make_certificates

    certs = make_certificates(tmp_path / "certs")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=certs["ca.crt"])
    server_tls.load_cert_chain(certs["server.crt"], certs["server.key"])
    server_tls.verify_mode = ssl.CERT_REQUIRED  # the archive wants our certificate
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    expected = "Basic " + base64.b64encode(b"node:s3cret").decode()

    def script(archive: Archive, seen: Seen) -> Answer:
        if seen.authorization != expected:
            return Answer(401, b"who are you")
        return archive.store(seen.uids)

    archive = Archive(script, tls=server_tls)
    archives.append(archive)
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(3))
    tls = HttpTls(certs["ca.crt"], certs["client.crt"], certs["client.key"])
    auth = DicomwebAuth(AuthKind.BASIC, username="node", password_file=password)
    drain(destination(archive.url, tls=tls, auth=auth), spool)
    assert_settled(spool, archive, uids)

    def echo(tls_yaml: str) -> subprocess.CompletedProcess[str]:
        auth_yaml = f"auth: {{type: basic, username: node, password_file: {password}}}"
        body = dicomweb_yaml(archive.url, f"{auth_yaml}\n  tls: {tls_yaml}")
        config = tmp_path / "node.yaml"
        config.write_text(default_config(tmp_path, 11112, extra_destinations=body))
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "echo", "cloud", "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    full = (
        f"{{ca: {certs['ca.crt']}, certificate: {certs['client.crt']}, "
        f"private_key: {certs['client.key']}}}"
    )
    ok = echo(full)
    assert ok.returncode == 0, ok.stderr
    assert "basic credentials accepted; TLS verified" in ok.stdout
    no_ca = echo(f"{{certificate: {certs['client.crt']}, private_key: {certs['client.key']}}}")
    assert no_ca.returncode == 4 and "TLS with" in no_ca.stderr and "certificate" in no_ca.stderr
    password.write_text("wrong\n")
    refused = echo(full)
    assert refused.returncode == 4
    assert "URL and TLS work, but the archive refuses the basic credentials" in refused.stderr


def test_google_service_account_token_from_a_local_token_endpoint(
    tmp_path: Path, archives: list[Archive]
) -> None:
    """google-auth signs a JWT with the service-account key and trades it at the key's
    token_uri; here that is the scripted archive, so the whole exchange runs offline."""
    from tests.test_operations import make_certificates

    def script(archive: Archive, seen: Seen) -> Answer:
        if seen.authorization != "Bearer ya29.test":
            return Answer(401, b"no token")
        return archive.store(seen.uids)

    archive = Archive(script)
    archives.append(archive)
    certs = make_certificates(tmp_path / "certs")
    key = tmp_path / "service-account.json"
    key.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test",
                "private_key_id": "1",
                "private_key": certs["client.key"].read_text(),
                "client_email": "node@test.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": archive.url.replace("/dicom-web", "/token"),
            }
        )
    )
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(3))
    auth = DicomwebAuth(AuthKind.GOOGLE, credentials_file=key)
    drain(destination(archive.url, auth=auth, max_parallel_requests=1), spool)
    assert_settled(spool, archive, uids)
    assert len(archive.token_requests) == 1  # one token, reused until it expires
    grant = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer"
    assert grant in archive.token_requests[0]


def test_orthanc_refuses_a_broken_instance_and_takes_the_others(
    orthanc_web: Orthanc, tmp_path: Path
) -> None:
    """Orthanc answers 400 for a batch holding an instance it cannot parse and lists
    the ones it stored: those are delivered, the broken one ends in failed/."""
    spool = Spool(tmp_path / "spool")
    uids = fill_outbox(spool, "cloud", small_cts(4, seed=300))
    broken = sorted(spool.pending_dir("cloud").glob("*.dcm"))[1]
    data = broken.read_bytes()
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]  # after the file meta group
    broken.write_bytes(data[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"garbage")
    dest = destination(f"{orthanc_web.url}/dicom-web", max_parallel_requests=1)
    drain(dest, spool)
    stored = orthanc_web.sop_instance_uids()
    failed = Outbox(spool, "cloud").list_failed()
    assert [f.sop_instance_uid for f in failed] == [uids[1]]
    assert "HTTP 400" in failed[0].info["error"]
    assert {u for u in uids if u != uids[1]} <= set(stored) and uids[1] not in stored
