"""DICOMweb destination: a STOW-RS client (PS3.18 10.5) that drains the destination's outbox.

Like the DICOM destination it has its own sender threads (``max_parallel_requests``);
each claims the oldest due instances, as many as fit in ``max_instances_per_request``
and ``max_request_size``, and POSTs them to ``{url}/studies`` as one
``multipart/related; type="application/dicom"`` request. The body is built from the
outbox files as they are on disk and streamed in chunks (httpx with an iterator body
and a precomputed Content-Length): neither a request nor an instance is ever held in
memory whole.

The answer is judged per instance (PS3.18 10.5.3, Table I.2-2):

- 200, and 202/409 with a body: an instance in the Referenced SOP Sequence is delivered;
  one in the Failed SOP Sequence is settled by its Failure Reason: A7xx and 0110 are
  retried, C122 is resent decompressed (``fallback: uncompressed``), an instance the
  archive already holds (Azure's 45070) is delivered, others go to ``failed/`` with
  the reason in the sidecar.
- 400 (or a 409 without a readable body) for several instances: the batch is split in
  halves until the bad instance is alone; it goes to ``failed/``, the others are delivered.
- 413: the batch is halved; an instance too large alone goes to ``failed/``.
- 415: resent decompressed when the fallback allows it, else ``failed/``.
- 408, 429, 5xx, connection errors and timeouts: the whole destination backs off
  (honouring Retry-After), as for an unreachable DICOM peer; instances that waited
  past ``give_up_after`` go to ``failed/``.
- 401/403: the credentials are fetched again once; if still refused the destination is
  held (``held.json``), nothing moves to ``failed/``, and it is tried again with backoff
  so that fixed credentials are picked up. ``dicom-node queue`` and the metric
  ``dicom_node_destination_held`` show it.

An instance leaves ``pending/`` only when delivered or moved to ``failed/``, so a crash
mid-request leaves it pending and it is sent again (at-least-once, as for C-STORE).
"""

from __future__ import annotations

import email.utils
import enum
import json
import logging
import math
import secrets
import shlex
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.destinations import Runner
from node.destinations.dicomweb_config import (
    AuthKind,
    DicomwebAuth,
    DicomwebDestination,
    HttpTls,
    describe_dicomweb,
)
from node.errors import DeliveryError
from node.fsutil import makedirs_durably, write_durably
from node.outbox import Failure, Outbox, PeerState, Scheduler, Waker, arrival_time, backoff
from node.spool import Spool

log = logging.getLogger("dicom_node.dicomweb")

POLL_SECONDS = 2.0  # idle re-scan, so that `dicom-node queue retry` is picked up
CHUNK = 1024 * 1024  # bytes read from an instance file per write to the socket
MAX_RESPONSE = 16 * 1024 * 1024  # a larger response body is cut here (it lists instances)
HELD_FILE = "held.json"
PLAIN_DIR = "decompressed"  # decompressed copies for the fallback, while they are sent
UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
MAX_RETRY_AFTER = 86400.0  # a Retry-After beyond a day is taken as a day

# Tags of the STOW-RS response (PS3.18 Table 10.5.3-1), in DICOM JSON form (PS3.18 F.2).
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
AZURE_ALREADY_STORED = 45070  # Azure's DICOM service: the instance is there already
AZURE_IN_PROGRESS = 45071  # Azure: the same instance is being stored just now
TRANSIENT_REASONS = frozenset({PROCESSING_FAILURE, 0x0213, AZURE_IN_PROGRESS})
RETRY_STATUSES = frozenset({408, 429})  # and every 5xx


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    DECOMPRESS = "decompress"  # resend it decompressed (C122 with fallback: uncompressed)
    GAVE_UP = "gave up"  # transient failures outlasted give_up_after


def reason_verdict(reason: int) -> Verdict:
    """What a Failure Reason (0008,1197) means for the outbox (PS3.18 Table I.2-2)."""
    if reason == AZURE_ALREADY_STORED:
        return Verdict.DELIVERED
    if 0xA700 <= reason <= 0xA7FF or reason in TRANSIENT_REASONS:
        return Verdict.TRANSIENT
    if reason == TRANSFER_SYNTAX_NOT_SUPPORTED:
        return Verdict.DECOMPRESS
    return Verdict.PERMANENT  # A9xx, Cxxx, 0122 and anything unknown


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Part:
    """One instance of a request: the file sent and its size."""

    item_id: str
    path: Path
    size: int


def part_header(boundary: str, size: int) -> bytes:
    return (
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {size}\r\n\r\n"
    ).encode("ascii")


def closing_delimiter(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def multipart_length(parts: Iterable[Part], boundary: str) -> int:
    """The exact body size of :func:`multipart_body`, sent as Content-Length."""
    return sum(len(part_header(boundary, p.size)) + p.size + 2 for p in parts) + len(
        closing_delimiter(boundary)
    )


def multipart_body(parts: list[Part], boundary: str) -> Iterator[bytes]:
    """The request body, read from the files in chunks as the socket takes them."""
    for part in parts:
        yield part_header(boundary, part.size)
        sent = 0
        with open(part.path, "rb") as f:
            while chunk := f.read(CHUNK):
                sent += len(chunk)
                yield chunk
        if sent != part.size:  # the Content-Length is already on its way
            raise OSError(f"{part.path.name} changed size while being sent")
        yield b"\r\n"
    yield closing_delimiter(boundary)


def new_boundary() -> str:
    # Random, so that it cannot occur in the instances it separates (RFC 2046 5.1.1).
    return "dicom-node-" + secrets.token_hex(16)


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class StoreReport:
    """The archive's per-instance answer: stored UIDs (with warning) and failed UIDs."""

    stored: dict[str, int | None]
    failed: dict[str, int | None]


def parse_store_response(body: bytes) -> StoreReport | None:
    """The Store Instances Response Module in DICOM JSON; None if it is not one."""
    try:
        raw = json.loads(body)
    except ValueError:
        return None
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if not isinstance(raw, dict):
        return None
    return StoreReport(
        _sequence(raw, REFERENCED_SOP_SEQUENCE, WARNING_REASON),
        _sequence(raw, FAILED_SOP_SEQUENCE, FAILURE_REASON),
    )


def _sequence(raw: dict[str, Any], tag: str, reason_tag: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    element = raw.get(tag)
    items = element.get("Value", []) if isinstance(element, dict) else []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if uid is None:
            continue
        reason = _first(item, reason_tag)
        try:
            out[str(uid)] = None if reason is None else int(reason)
        except (TypeError, ValueError):
            out[str(uid)] = None
    return out


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date; RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(when - now, 0.0), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Reply:
    """An HTTP answer (``status``), or why there was none (``status`` None)."""

    status: int | None
    body: bytes = b""
    error: str = ""
    retry_after: float | None = None
    local: bool = False  # the problem is on our side (a file could not be read)

    def describe(self) -> str:
        if self.status is None:
            return self.error
        text = self.body[:300].decode("utf-8", "replace").strip()
        phrase = _phrase(self.status)
        return f"HTTP {self.status} {phrase}" + (f": {text}" if text else "")


def _phrase(status: int) -> str:
    return httpx.codes.get_reason_phrase(status)


# --------------------------------------------------------------------------- auth


class AuthUnavailable(Exception):
    """No credentials could be obtained (a token command failed, a file is unreadable)."""


class Credentials(Protocol):
    def headers(self) -> dict[str, str]: ...

    def refresh(self) -> None:
        """Obtain fresh credentials (after a 401/403)."""


class NoCredentials:
    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self) -> None:
        pass


class BasicCredentials:
    """HTTP basic auth; the password file is read again on refresh (it may be rotated)."""

    def __init__(self, username: str, password_file: Path) -> None:
        self.username = username
        self.password_file = password_file
        self._header = ""
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        with self._lock:
            if not self._header:
                self._load()
            return {"Authorization": self._header}

    def refresh(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> None:
        password = _read_secret(self.password_file)
        self._header = httpx.BasicAuth(self.username, password)._auth_header


class TokenCredentials:
    """A bearer token from a file (read again on refresh) or from a command's output
    (run again when ``lifetime`` has passed and on refresh)."""

    def __init__(
        self, token_file: Path | None, command: str, lifetime: float, timeout: float
    ) -> None:
        self.token_file = token_file
        self.command = command
        self.lifetime = lifetime
        self.timeout = timeout
        self._token = ""
        self._expires = 0.0
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        with self._lock:
            if not self._token or (self.command and time.monotonic() >= self._expires):
                self._load()
            return {"Authorization": f"Bearer {self._token}"}

    def refresh(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> None:
        if self.token_file is not None:
            self._token = _read_secret(self.token_file)
        else:
            self._token = _run_token_command(self.command, self.timeout)
        self._expires = time.monotonic() + self.lifetime


class GoogleCredentials:
    """Service-account credentials through google-auth (``pip install dicom-node[google]``).

    google-auth signs a JWT with the key and trades it for an access token at the key's
    ``token_uri``; it knows the token's expiry and refreshes it shortly before.
    """

    def __init__(self, credentials_file: Path, scopes: tuple[str, ...]) -> None:
        try:
            from google.auth.transport.requests import Request
            from google.oauth2 import service_account
        except ImportError as exc:
            raise AuthUnavailable(
                "google authentication needs google-auth and requests: "
                "pip install 'dicom-node[google]'"
            ) from exc
        try:
            self._creds = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                str(credentials_file), scopes=list(scopes)
            )
        except (OSError, ValueError) as exc:
            raise AuthUnavailable(f"cannot load {credentials_file}: {exc}") from exc
        self._request = Request()
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        with self._lock:
            if not self._creds.valid:
                self._refresh()
            return {"Authorization": f"Bearer {self._creds.token}"}

    def refresh(self) -> None:
        with self._lock:
            self._refresh()

    def _refresh(self) -> None:
        try:
            self._creds.refresh(self._request)
        except Exception as exc:  # noqa: BLE001 - google-auth raises its own and requests' errors
            raise AuthUnavailable(f"google-auth could not get a token: {exc}") from exc


class DeferredCredentials:
    """Credentials made on first use, and made again while making them fails (e.g.
    google-auth missing or a key file unreadable): the runner then holds the
    destination with that reason instead of sending without credentials."""

    def __init__(self, auth: DicomwebAuth | None, timeout: float) -> None:
        self.auth = auth
        self.timeout = timeout
        self._inner: Credentials | None = None
        self._lock = threading.Lock()

    def headers(self) -> dict[str, str]:
        return self._get().headers()

    def refresh(self) -> None:
        self._get().refresh()

    def _get(self) -> Credentials:
        with self._lock:
            if self._inner is None:
                self._inner = make_credentials(self.auth, self.timeout)
            return self._inner


def make_credentials(auth: DicomwebAuth | None, timeout: float) -> Credentials:
    if auth is None:
        return NoCredentials()
    if auth.kind is AuthKind.BASIC:
        assert auth.password_file is not None
        return BasicCredentials(auth.username, auth.password_file)
    if auth.kind is AuthKind.BEARER:
        return TokenCredentials(auth.token_file, auth.token_command, auth.token_lifetime, timeout)
    assert auth.credentials_file is not None
    return GoogleCredentials(auth.credentials_file, auth.scopes)


def _read_secret(path: Path) -> str:
    try:
        secret = path.read_text("utf-8").strip()
    except OSError as exc:
        raise AuthUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not secret:
        raise AuthUnavailable(f"{path} is empty")
    return secret


def _run_token_command(command: str, timeout: float) -> str:
    """The token a command prints (e.g. ``gcloud auth print-access-token``); no shell."""
    try:
        done = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthUnavailable(f"token_command {command!r} could not run: {exc}") from exc
    token = done.stdout.strip()
    if done.returncode != 0 or not token:
        problem = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise AuthUnavailable(
            f"token_command {command!r} failed (exit {done.returncode}): {problem[0]}"
        )
    return token


# --------------------------------------------------------------------------- HTTP client


def ssl_context(tls: HttpTls | None) -> ssl.SSLContext:
    """The system's CAs, or ``tls.ca``; our certificate when the archive asks for one."""
    cafile = str(tls.ca) if tls and tls.ca else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls and tls.certificate and tls.private_key:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def new_client(dest: DicomwebDestination) -> httpx.Client:
    return httpx.Client(
        verify=ssl_context(dest.tls),
        timeout=httpx.Timeout(dest.timeout),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        follow_redirects=False,  # a redirected POST would have to stream the body again
        headers={"User-Agent": "dicom-node"},
    )


def _read_limited(rsp: httpx.Response) -> bytes:
    body = bytearray()
    for chunk in rsp.iter_bytes():
        body += chunk[: MAX_RESPONSE - len(body)]
        if len(body) >= MAX_RESPONSE:
            break
    return bytes(body)


def _transport_problem(exc: Exception, dest: DicomwebDestination) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from {dest.url} within {dest.timeout:g} s ({type(exc).__name__})"
    tls = _tls_cause(exc)
    if tls is not None:
        return f"TLS with {dest.url} failed: {tls}"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {dest.url}: {exc}"
    return f"connection to {dest.url} lost: {type(exc).__name__}: {exc}"


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(10):  # httpx wraps httpcore's error, which wraps the ssl module's
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# --------------------------------------------------------------------------- state files


@dataclass
class HeldState:
    """The archive refuses our credentials; kept in ``held.json`` for ``dicom-node queue``."""

    since: float
    error: str
    attempts: int = 1
    next_attempt: float = 0.0


def held_path(spool: Spool, name: str) -> Path:
    return spool.pending_dir(name).parent / HELD_FILE


def read_held(path: Path) -> HeldState | None:
    try:
        raw = json.loads(path.read_text("utf-8"))
        return HeldState(
            float(raw["since"]),
            str(raw["error"]),
            int(raw.get("attempts", 1)),
            float(raw.get("next_attempt", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_outbox_lines(dest: DicomwebDestination, spool: Spool) -> list[str]:
    """``dicom-node queue``: the destination line's ``where`` part and a held warning."""
    lines = [describe_dicomweb(dest)]
    held = read_held(held_path(spool, dest.name))
    if held is not None:
        lines.append(
            f"  HELD: the archive refuses the credentials since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.since))} "
            f"({held.attempts} attempt(s)); nothing is sent or failed until they work: "
            f"{held.error}"
        )
    return lines


class HeldCollector(Collector):
    """``dicom_node_destination_held``: 1 while a dicomweb destination is refused its credentials."""

    def __init__(self, spool: Spool, names: Callable[[], Iterable[str]]) -> None:
        self._spool = spool
        self._names = names

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "dicom_node_destination_held",
            "1 while a dicomweb destination is held because the archive refuses its credentials",
            labels=["destination"],
        )
        for name in self._names():
            gauge.add_metric([name], 0 if read_held(held_path(self._spool, name)) is None else 1)
        yield gauge


# --------------------------------------------------------------------------- runner


@dataclass(frozen=True)
class Meta:
    sop_instance: str
    transfer_syntax: UID


class DicomwebRunner(Runner):
    """Sends one DICOMweb destination's outbox; see the module docstring."""

    def __init__(self, dest: DicomwebDestination, spool: Spool) -> None:
        self.dest = dest
        self.outbox = Outbox(spool, dest.name)
        self.scheduler = Scheduler(self.outbox, dest.retry)
        self.waker = Waker()
        self.held_file = held_path(spool, dest.name)
        self.plain_dir = self.outbox.pending.parent / PLAIN_DIR
        self.url = f"{dest.url}/studies"
        self._credentials: Credentials = NoCredentials()  # replaced in start()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._metas: dict[str, Meta | None] = {}
        self._peer = PeerState()
        self._held: HeldState | None = None
        # Instances the archive wants decompressed (C122 or 415); memory only: after a
        # restart the archive says it again.
        self._plain: set[str] = set()
        self._clients: list[httpx.Client] = []

    # ---------------------------------------------------------------- Runner protocol

    def start(self) -> None:
        self.outbox.create()
        makedirs_durably(self.plain_dir)
        for leftover in self.plain_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self._peer = self.outbox.read_peer()
        self._held = read_held(self.held_file)
        self._credentials = DeferredCredentials(self.dest.auth, self.dest.timeout)
        for n in range(self.dest.max_parallel_requests):
            thread = threading.Thread(
                target=self._sender, name=f"stow-{self.dest.name}-{n}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def notify(self) -> None:
        self.waker.notify()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.waker.notify()
        with self._lock:
            clients = list(self._clients)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        for client in clients:
            client.close()

    # ---------------------------------------------------------------- sender thread

    def _sender(self) -> None:
        client = new_client(self.dest)
        with self._lock:
            self._clients.append(client)
        while not self._stopping.is_set():
            seen = self.waker.mark()
            wait = self._wait_for_archive()
            if wait > 0:
                self.waker.wait(seen, min(wait, POLL_SECONDS))
                continue
            batch, next_due = self.scheduler.claim(self._batch_limit(), self._fits())
            if not batch:
                self.waker.wait(seen, min(next_due, POLL_SECONDS))
                continue
            try:
                self._deliver(client, batch)
            except Exception:  # noqa: BLE001 - a bug must not silently stop the destination
                log.exception("%s: unexpected error while sending; retrying later", self.dest.name)
                self._stopping.wait(1.0)
            finally:
                self.scheduler.release(batch)

    def _batch_limit(self) -> int:
        n, most = self.dest.max_parallel_requests, self.dest.max_instances_per_request
        if n == 1:
            return most
        # Spread a small backlog over the parallel requests.
        return max(1, min(most, math.ceil(self.scheduler.due_count() / n)))

    def _fits(self) -> Callable[[str], bool]:
        """Accept instances while the request stays within max_request_size (one always fits)."""
        total = 0
        boundary_overhead = len(part_header(new_boundary(), 1 << 40)) + 2

        def accept(item_id: str) -> bool:
            nonlocal total
            try:
                size = self.outbox.pending_path(item_id).stat().st_size + boundary_overhead
            except OSError:
                return False
            if total and total + size > self.dest.max_request_size:
                return False
            total += size
            return True

        return accept

    def _deliver(self, client: httpx.Client, batch: list[str]) -> None:
        readable = []
        for item_id in batch:
            if self._meta(item_id) is None:
                self._settle(item_id, Verdict.PERMANENT, "not a readable DICOM file")
            else:
                readable.append(item_id)
        if readable:
            self._exchange(client, readable)

    # ---------------------------------------------------------------- one request

    def _exchange(self, client: httpx.Client, ids: list[str]) -> bool:
        """Send ``ids`` in one request and settle each; False: stop sending for now."""
        if self._stopping.is_set():
            return False
        parts, plain_files = self._parts(ids)
        try:
            if not parts:
                return True
            reply = self._post(client, parts)
            if reply.status in (401, 403):
                # Credentials may have expired (or been fixed): fetch them again, once.
                try:
                    self._credentials.refresh()
                    reply = self._post(client, parts)
                except AuthUnavailable as exc:
                    reply = Reply(reply.status, error=str(exc))
        finally:
            for path in plain_files:
                path.unlink(missing_ok=True)
        return self._judge(client, [p.item_id for p in parts], reply)

    def _parts(self, ids: list[str]) -> tuple[list[Part], list[Path]]:
        """The files to send: as on disk, or decompressed where the archive asked for it."""
        parts: list[Part] = []
        plain_files: list[Path] = []
        for item_id in ids:
            path = self.outbox.pending_path(item_id)
            meta = self._metas.get(item_id)
            if item_id in self._plain and meta and meta.transfer_syntax not in UNCOMPRESSED:
                try:
                    path = self._decompress(item_id, path)
                except Exception as exc:  # noqa: BLE001 - decoding errors of every codec
                    self._settle(
                        item_id, Verdict.PERMANENT, f"cannot decompress for the archive: {exc}"
                    )
                    continue
                plain_files.append(path)
            try:
                parts.append(Part(item_id, path, path.stat().st_size))
            except OSError as exc:
                self._settle(item_id, Verdict.TRANSIENT, f"cannot read {path.name}: {exc}")
        return parts, plain_files

    def _decompress(self, item_id: str, path: Path) -> Path:
        # The DICOM destination's decoder chain: SOP Instance UID kept, bit-exact pixels.
        from node.destinations.dicom import decompressed

        target = self.plain_dir / f"{item_id}.dcm"
        decompressed(path).save_as(target, enforce_file_format=True)
        return target

    def _post(self, client: httpx.Client, parts: list[Part]) -> Reply:
        boundary = new_boundary()
        try:
            headers = {
                **self._credentials.headers(),
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Content-Length": str(multipart_length(parts, boundary)),
                "Accept": "application/dicom+json",
            }
        except AuthUnavailable as exc:
            return Reply(401, error=str(exc))
        try:
            with client.stream(
                "POST", self.url, content=multipart_body(parts, boundary), headers=headers
            ) as rsp:
                body = _read_limited(rsp)
                return Reply(
                    rsp.status_code,
                    body,
                    retry_after=retry_after(rsp.headers.get("Retry-After"), time.time()),
                )
        except httpx.TransportError as exc:
            return Reply(None, error=_transport_problem(exc, self.dest))
        except OSError as exc:  # reading an instance file
            return Reply(None, error=f"cannot read an instance to send: {exc}", local=True)

    # ---------------------------------------------------------------- judging

    def _judge(self, client: httpx.Client, ids: list[str], reply: Reply) -> bool:
        status = reply.status
        if status in (401, 403):
            self._hold(reply.error or reply.describe())
            return False
        if reply.local:
            for item_id in ids:
                self._settle(item_id, Verdict.TRANSIENT, reply.error)
            return True
        if status is None or status in RETRY_STATUSES or status >= 500:
            self._archive_failed(reply.describe(), reply.retry_after)
            self._give_up_overdue(ids)
            return False
        self._archive_ok()
        report = parse_store_response(reply.body) if status in (200, 202, 409) else None
        if status == 200 or (status in (202, 409) and report is not None):
            return self._settle_each(client, ids, status, report, reply)
        if status == 415:
            return self._unsupported_media_type(client, ids, reply)
        if status in (400, 409, 413):
            return self._split(client, self._stored_anyway(ids, report, reply), reply)
        # 3xx, 404, 405 and the like: the URL or the archive is misconfigured; wait
        # for the operator like for an unreachable peer.
        self._archive_failed(f"{reply.describe()} (from POST {self.url})", reply.retry_after)
        self._give_up_overdue(ids)
        return False

    def _settle_each(
        self,
        client: httpx.Client,
        ids: list[str],
        status: int,
        report: StoreReport | None,
        reply: Reply,
    ) -> bool:
        again: list[str] = []
        for item_id in ids:
            meta = self._metas.get(item_id)
            uid = meta.sop_instance if meta else ""
            if report is not None and uid in report.failed:
                reason = report.failed[uid]
                verdict = Verdict.PERMANENT if reason is None else reason_verdict(reason)
                text = f"HTTP {status}, failure reason " + (
                    "not given" if reason is None else f"0x{reason:04X} ({reason})"
                )
                if verdict is Verdict.DECOMPRESS:
                    if self._can_decompress(item_id):
                        again.append(item_id)
                        continue
                    verdict = Verdict.PERMANENT
                    text += ": transfer syntax not supported (fallback: " + self.dest.fallback + ")"
                self._settle(item_id, verdict, text, reason)
            elif status == 200 or (report is not None and uid in report.stored):
                warning = report.stored.get(uid) if report is not None else None
                note = f"with warning 0x{warning:04X}" if warning else ""
                self._settle(item_id, Verdict.DELIVERED, note)
            else:
                self._settle(
                    item_id,
                    Verdict.TRANSIENT,
                    f"HTTP {status}: the archive's answer does not mention this instance",
                )
        if again:
            self._mark_plain(again)
            return self._exchange(client, again)
        return True

    def _stored_anyway(self, ids: list[str], report: StoreReport | None, reply: Reply) -> list[str]:
        """Settle what a refused request's body says was stored; the rest is to be split.

        Orthanc answers 400 for a batch with an unreadable instance and lists the
        instances it stored in the same body.
        """
        if report is None and reply.status == 400:
            report = parse_store_response(reply.body)
        if report is None or not report.stored:
            return ids
        rest = []
        for item_id in ids:
            meta = self._metas.get(item_id)
            if meta is not None and meta.sop_instance in report.stored:
                self._settle(item_id, Verdict.DELIVERED, f"(HTTP {reply.status} for the others)")
            else:
                rest.append(item_id)
        return rest

    def _unsupported_media_type(self, client: httpx.Client, ids: list[str], reply: Reply) -> bool:
        convertible = [i for i in ids if self._can_decompress(i)]
        if convertible:
            self._mark_plain(convertible)
            return self._exchange(client, ids)
        return self._split(client, ids, reply)

    def _split(self, client: httpx.Client, ids: list[str], reply: Reply) -> bool:
        """Halve a refused batch to find the instance(s) at fault; alone, it fails."""
        if not ids:
            return True
        if len(ids) == 1:
            self._settle(ids[0], Verdict.PERMANENT, reply.describe(), None)
            return True
        half = len(ids) // 2
        log.info(
            "%s: %s for %d instances; sending them in two halves",
            self.dest.name,
            f"HTTP {reply.status}",
            len(ids),
        )
        return self._exchange(client, ids[:half]) and self._exchange(client, ids[half:])

    def _can_decompress(self, item_id: str) -> bool:
        meta = self._metas.get(item_id)
        return (
            self.dest.fallback == "uncompressed"
            and item_id not in self._plain
            and meta is not None
            and meta.transfer_syntax not in UNCOMPRESSED
        )

    def _mark_plain(self, ids: list[str]) -> None:
        for item_id in ids:
            meta = self._metas.get(item_id)
            log.warning(
                "%s: the archive does not take %s as %s; sending it decompressed",
                self.dest.name,
                meta.sop_instance if meta else item_id,
                meta.transfer_syntax.name if meta else "?",
            )
        with self._lock:
            self._plain.update(ids)

    def _settle(
        self, item_id: str, verdict: Verdict, error: str, reason: int | None = None
    ) -> None:
        meta = self._metas.get(item_id)
        uid = meta.sop_instance if meta else ""
        if verdict is Verdict.DELIVERED:
            log.debug("%s: %s delivered %s", self.dest.name, uid, error)
            self.scheduler.delivered(item_id)
            self._forget(item_id)
            return
        if verdict is Verdict.TRANSIENT and self.scheduler.transient(item_id, error):
            log.warning("%s: %s not stored, will retry: %s", self.dest.name, uid, error)
            return
        permanent = verdict not in (Verdict.TRANSIENT, Verdict.GAVE_UP)
        failure = Failure(error=error, status=reason, permanent=permanent)
        log.error("%s: %s moved to failed/: %s", self.dest.name, uid, error)
        self.scheduler.fail(item_id, failure, uid)
        self._forget(item_id)

    def _meta(self, item_id: str) -> Meta | None:
        with self._lock:
            if item_id in self._metas:
                return self._metas[item_id]
        try:
            fm = read_file_meta_info(self.outbox.pending_path(item_id))
            meta: Meta | None = Meta(str(fm.MediaStorageSOPInstanceUID), UID(fm.TransferSyntaxUID))
        except Exception:  # noqa: BLE001 - any unreadable meta makes the file unsendable
            meta = None
        with self._lock:
            self._metas[item_id] = meta
        return meta

    def _forget(self, item_id: str) -> None:
        with self._lock:
            self._metas.pop(item_id, None)
            self._plain.discard(item_id)

    # ---------------------------------------------------------------- the archive

    def _wait_for_archive(self) -> float:
        now = time.time()
        with self._lock:
            waits = [self._peer.next_attempt - now]
            if self._held is not None:
                waits.append(self._held.next_attempt - now)
            return max(waits)

    def _archive_ok(self) -> None:
        with self._lock:
            peer_was_down, held = self._peer.failures, self._held
            self._peer, self._held = PeerState(), None
            if peer_was_down:
                self.outbox.save_peer(self._peer)
        if held is not None:
            self.held_file.unlink(missing_ok=True)
            log.info("%s: the archive accepts the credentials again", self.dest.name)
        if peer_was_down:
            log.info(
                "%s: archive reachable again after %d failed attempt(s)",
                self.dest.name,
                peer_was_down,
            )

    def _archive_failed(self, error: str, wait: float | None) -> None:
        now = time.time()
        with self._lock:
            peer = self._peer
            failures = peer.failures + 1
            delay = backoff(self.dest.retry, failures)
            if wait is not None:
                delay = max(delay, wait)  # Retry-After: not sooner than the archive asks
            self._peer = PeerState(
                failures=failures,
                down_since=peer.down_since if peer.down_since is not None else now,
                next_attempt=now + delay,
                last_error=error,
            )
            self.outbox.save_peer(self._peer)
        log.warning("%s: %s; next attempt in %.1f s", self.dest.name, error, delay)

    def _hold(self, error: str) -> None:
        """Credentials refused: nothing is sent (nor failed) until they work again."""
        now = time.time()
        with self._lock:
            held = self._held
            attempts = 1 if held is None else held.attempts + 1
            self._held = HeldState(
                since=now if held is None else held.since,
                error=error,
                attempts=attempts,
                next_attempt=now + backoff(self.dest.retry, attempts),
            )
            state = asdict(self._held)
        write_durably(self.held_file, [json.dumps(state, indent=1).encode() + b"\n"])
        log.error(
            "%s: HELD: the archive refuses the credentials (%s); nothing is sent until they "
            "work; next attempt in %.0f s",
            self.dest.name,
            error,
            state["next_attempt"] - now,
        )

    def _give_up_overdue(self, batch: list[str]) -> None:
        """During a long outage, move instances that waited past give_up_after to failed/.

        An instance's clock starts when it arrived or when the outage began, whichever
        is later (as for the DICOM destination).
        """
        with self._lock:
            since, error = self._peer.down_since, self._peer.last_error
        if since is None:
            return
        now = time.time()
        limit = self.dest.retry.give_up_after

        def overdue(item_id: str) -> bool:
            return now - max(arrival_time(item_id), since) >= limit

        others, _ = self.scheduler.claim(10_000, overdue)
        reason = f"archive unavailable since {time.ctime(since)}: {error}"
        try:
            for item_id in [i for i in batch if overdue(i)] + others:
                self._meta(item_id)
                self._settle(item_id, Verdict.GAVE_UP, reason)
        finally:
            self.scheduler.release(others)


# --------------------------------------------------------------------------- echo


@dataclass(frozen=True)
class EchoReport:
    seconds: float
    status: int
    studies: int | None  # how many the archive listed (at most 1 asked for)


def echo(dest: DicomwebDestination) -> EchoReport:
    """An authenticated QIDO-RS probe: ``GET {url}/studies?limit=1``; raises saying what failed."""
    url = f"{dest.url}/studies"
    try:
        credentials = make_credentials(dest.auth, dest.timeout)
    except AuthUnavailable as exc:
        raise DeliveryError(f"{dest.name}: no credentials: {exc}") from exc
    started = time.perf_counter()
    with new_client(dest) as client:
        rsp = _probe(client, url, credentials, dest)
        if rsp.status_code in (401, 403) and dest.auth is not None:
            try:
                credentials.refresh()
            except AuthUnavailable as exc:
                raise DeliveryError(f"{dest.name}: no credentials: {exc}") from exc
            rsp = _probe(client, url, credentials, dest)
    seconds = time.perf_counter() - started
    status = rsp.status_code
    if status in (401, 403):
        given = f"the {dest.auth.kind.value} credentials" if dest.auth else "no credentials"
        raise DeliveryError(
            f"{dest.name}: URL and TLS work, but the archive refuses {given}: "
            f"HTTP {status} {_phrase(status)}"
        )
    if status == 404:
        raise DeliveryError(
            f"{dest.name}: {url} answered HTTP 404 Not Found: is {dest.url} the DICOMweb "
            "service root?"
        )
    if status not in (200, 204):
        raise DeliveryError(
            f"{dest.name}: GET {url}?limit=1 answered HTTP {status} {_phrase(status)}"
        )
    studies: int | None = None
    if status == 200:
        try:
            listed = json.loads(rsp.content)
            studies = len(listed) if isinstance(listed, list) else None
        except ValueError:
            studies = None
    return EchoReport(seconds, status, 0 if status == 204 else studies)


def _probe(
    client: httpx.Client, url: str, credentials: Credentials, dest: DicomwebDestination
) -> httpx.Response:
    try:
        headers = {**credentials.headers(), "Accept": "application/dicom+json"}
        return client.get(url, params={"limit": "1"}, headers=headers)
    except AuthUnavailable as exc:
        raise DeliveryError(f"{dest.name}: no credentials: {exc}") from exc
    except httpx.TransportError as exc:
        raise DeliveryError(f"{dest.name}: {_transport_problem(exc, dest)}") from exc


def echo_text(dest: DicomwebDestination) -> str:
    """``dicom-node echo`` for a dicomweb destination: say plainly what works."""
    report = echo(dest)
    auth = f"{dest.auth.kind.value} credentials accepted" if dest.auth else "no credentials needed"
    tls = "TLS verified" if dest.url.startswith("https:") else "plain HTTP, no TLS"
    listed = "" if report.studies is None else f", {report.studies} study listed (limit=1)"
    return (
        f"{dest.name}: QIDO-RS GET {dest.url}/studies?limit=1 answered HTTP {report.status} "
        f"in {report.seconds * 1000:.0f} ms{listed}\n  URL works; {auth}; {tls}"
    )
