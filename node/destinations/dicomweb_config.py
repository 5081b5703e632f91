"""The DICOMweb (STOW-RS) destination type: its settings, their parsing, its TYPE.

Kept apart from :mod:`node.destinations.dicomweb` (the sender) so that loading a
config (workers, ``check-config``) does not import the HTTP client. Errors name their
exact place in the file, like the rest of :mod:`node.config`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from node.destinations import DestinationType, ParseContext, Runner
from node.errors import ConfigError
from node.schema import RetryPolicy
from node.schema import as_duration as _duration
from node.schema import as_int as _int
from node.schema import as_size as _bytes
from node.schema import existing_file as _existing_file
from node.schema import expect_mapping as _expect_mapping
from node.schema import parse_retry as _parse_retry
from node.schema import reject_unknown as _reject_unknown

if TYPE_CHECKING:
    from pydicom.dataset import Dataset  # noqa: F401

    from node.spool import Spool

# The smallest request limit that still leaves room for a multipart part's headers.
MIN_REQUEST_SIZE = 64 * 1024


class AuthKind(enum.Enum):
    BASIC = "basic"
    BEARER = "bearer"
    GOOGLE = "google"


@dataclass(frozen=True)
class DicomwebAuth:
    """How requests authenticate; only the fields of ``kind`` are set."""

    kind: AuthKind
    username: str = ""
    password_file: Path | None = None
    token_file: Path | None = None
    token_command: str = ""
    # A token from token_command is fetched again after this long, and on a 401/403.
    token_lifetime: float = 45 * 60.0
    credentials_file: Path | None = None  # google: a service-account JSON key
    scopes: tuple[str, ...] = ("https://www.googleapis.com/auth/cloud-healthcare",)


@dataclass(frozen=True)
class HttpTls:
    """HTTPS towards the archive: a private CA (else the system's) and a client certificate."""

    ca: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None


@dataclass(frozen=True)
class DicomwebDestination:
    name: str
    url: str  # the service root, without a trailing slash; STOW-RS posts to {url}/studies
    auth: DicomwebAuth | None = None
    tls: HttpTls | None = None
    max_instances_per_request: int = 20
    max_request_size: int = 16 * 1024**2
    max_parallel_requests: int = 2
    timeout: float = 60.0
    fallback: Literal["uncompressed", "fail"] = "uncompressed"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    type: Literal["dicomweb"] = "dicomweb"


KEYS = (
    "type",
    "url",
    "auth",
    "tls",
    "max_instances_per_request",
    "max_request_size",
    "max_parallel_requests",
    "timeout",
    "fallback",
    "retry",
)


def parse_dicomweb(
    name: str, body: dict[str, Any], where: str, base_dir: Path
) -> DicomwebDestination:
    """``destinations.<name>`` of ``type: dicomweb``."""
    _reject_unknown(body, where, KEYS)
    if "url" not in body:
        raise ConfigError(
            f"{where}.url: required for a dicomweb destination (the DICOMweb service root, "
            "e.g. https://archive.example.org/dicom-web)"
        )
    fallback = body.get("fallback", "uncompressed")
    if fallback not in ("uncompressed", "fail"):
        raise ConfigError(f"{where}.fallback: {fallback!r} is not one of uncompressed, fail")
    size = _bytes(body.get("max_request_size", "16MiB"), f"{where}.max_request_size")
    if size < MIN_REQUEST_SIZE:
        raise ConfigError(
            f"{where}.max_request_size: must be at least 64KiB, got {body['max_request_size']!r}"
        )
    return DicomwebDestination(
        name=name,
        url=_url(body["url"], f"{where}.url"),
        auth=_parse_auth(body["auth"], f"{where}.auth", base_dir) if body.get("auth") else None,
        tls=_parse_http_tls(body["tls"], f"{where}.tls", base_dir) if body.get("tls") else None,
        max_instances_per_request=_int(
            body.get("max_instances_per_request", 20), f"{where}.max_instances_per_request", 1
        ),
        max_request_size=size,
        max_parallel_requests=_int(
            body.get("max_parallel_requests", 2), f"{where}.max_parallel_requests", 1, 64
        ),
        timeout=_duration(body.get("timeout", 60), f"{where}.timeout"),
        fallback=fallback,
        retry=_parse_retry(body.get("retry") or {}, f"{where}.retry"),
    )


def _url(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {value!r}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where}: the service root takes no query or fragment, got {value!r}")
    return value.strip().rstrip("/")


def _parse_auth(raw: Any, where: str, base_dir: Path) -> DicomwebAuth:
    _expect_mapping(raw, where)
    kinds = ", ".join(k.value for k in AuthKind)
    try:
        kind = AuthKind(raw.get("type"))
    except ValueError:
        raise ConfigError(f"{where}.type: {raw.get('type')!r} is not one of {kinds}") from None
    if kind is AuthKind.BASIC:
        _reject_unknown(raw, where, ("type", "username", "password_file"))
        for key in ("username", "password_file"):
            if key not in raw:
                raise ConfigError(f"{where}.{key}: required for basic authentication")
        username = raw["username"]
        if not isinstance(username, str) or not username or ":" in username:
            raise ConfigError(f"{where}.username: expected a user name without ':'")
        return DicomwebAuth(
            kind,
            username=username,
            password_file=_existing_file(raw["password_file"], f"{where}.password_file", base_dir),
        )
    if kind is AuthKind.BEARER:
        _reject_unknown(raw, where, ("type", "token_file", "token_command", "token_lifetime"))
        if ("token_file" in raw) == ("token_command" in raw):
            raise ConfigError(f"{where}: give exactly one of token_file, token_command")
        command = raw.get("token_command", "")
        if "token_command" in raw and (not isinstance(command, str) or not command.strip()):
            raise ConfigError(f"{where}.token_command: expected a command line, got {command!r}")
        return DicomwebAuth(
            kind,
            token_file=_existing_file(raw["token_file"], f"{where}.token_file", base_dir)
            if "token_file" in raw
            else None,
            token_command=command.strip() if command else "",
            token_lifetime=_duration(raw.get("token_lifetime", "45m"), f"{where}.token_lifetime"),
        )
    _reject_unknown(raw, where, ("type", "credentials_file", "scopes"))
    if "credentials_file" not in raw:
        raise ConfigError(f"{where}.credentials_file: required (a service-account JSON key)")
    scopes = raw.get("scopes", list(DicomwebAuth.scopes))
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ConfigError(f"{where}.scopes: expected a non-empty list of OAuth scopes")
    return DicomwebAuth(
        kind,
        credentials_file=_existing_file(
            raw["credentials_file"], f"{where}.credentials_file", base_dir
        ),
        scopes=tuple(scopes),
    )


def _parse_http_tls(raw: Any, where: str, base_dir: Path) -> HttpTls:
    _expect_mapping(raw, where)
    _reject_unknown(raw, where, ("ca", "certificate", "private_key"))
    if ("certificate" in raw) != ("private_key" in raw):
        raise ConfigError(f"{where}: give both certificate and private_key, or neither")
    files = {key: _existing_file(raw[key], f"{where}.{key}", base_dir) for key in raw}
    return HttpTls(files.get("ca"), files.get("certificate"), files.get("private_key"))


def describe_dicomweb(dest: DicomwebDestination) -> str:
    """One line for ``check-config`` and ``queue``."""
    auth = f"{dest.auth.kind.value} auth" if dest.auth else "no auth"
    return (
        f"dicomweb {dest.url} ({auth}, up to {dest.max_instances_per_request} instances and "
        f"{dest.max_request_size} bytes per request, {dest.max_parallel_requests} in parallel, "
        f"fallback {dest.fallback})"
    )


class DicomwebType(DestinationType[DicomwebDestination]):
    """``type: dicomweb``: an outbox sent by STOW-RS (node/destinations/dicomweb.py)."""

    name = "dicomweb"
    settings = DicomwebDestination

    def parse(
        self, name: str, body: dict[str, Any], where: str, context: ParseContext
    ) -> DicomwebDestination:
        return parse_dicomweb(name, body, where, context.base_dir)

    def describe(self, dest: DicomwebDestination) -> str:
        return describe_dicomweb(dest)

    def summary(self, dest: DicomwebDestination) -> str:
        return f"dicomweb {dest.url}"

    def status_lines(self, dest: DicomwebDestination, spool: Spool) -> list[str]:
        from node.destinations.dicomweb import describe_outbox_lines

        return describe_outbox_lines(dest, spool)[1:]

    def runner(self, dest: DicomwebDestination, spool: Spool) -> Runner:
        from node.destinations.dicomweb import DicomwebRunner

        return DicomwebRunner(dest, spool)

    def echo(self, dest: DicomwebDestination, sop_class: str) -> str:
        from node.destinations.dicomweb import echo_text

        return echo_text(dest)


TYPE = DicomwebType()
