"""DICOM destination: a PACS or another node, sent to by C-STORE (``type: dicom``).

This module is the type (settings, parsing, ``check-config`` and ``queue`` lines,
``dicom-node echo``) and is cheap to import: worker processes unpickle its settings.
The parts that need pynetdicom's SCU side are imported when used:

- :mod:`node.destinations.dicom_sender`: the runner, sender threads draining the outbox;
- :mod:`node.destinations.dicom_net`: associations, presentation contexts, C-ECHO;
- :mod:`node.destinations.peer`: the peer's health and backoff;
- :mod:`node.destinations.commitment`: Storage Commitment (PS3.4 Annex J).

The sender's names (``DicomRunner``, ``judge``, ``associate``...) can still be
imported from here, as before the split.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from node.destinations import DestinationType, ParseContext, Runner
from node.errors import ConfigError
from node.schema import (
    DEFAULT_MAX_PDU,
    INTERNAL,
    RetryPolicy,
    as_ae_title,
    as_bool,
    as_duration,
    as_host,
    as_int,
    as_port,
    defaults,
    existing_file,
    expect_mapping,
    parse_retry,
    reject_unknown,
    yaml_keys,
)

if TYPE_CHECKING:
    # The names in _MOVED, below, for type checkers ("X as X": re-exported).
    from node.destinations.dicom_net import AssociationFailed as AssociationFailed
    from node.destinations.dicom_net import ContextPlan as ContextPlan
    from node.destinations.dicom_net import associate as associate
    from node.destinations.dicom_net import echo as echo
    from node.destinations.dicom_net import new_ae as new_ae
    from node.destinations.dicom_sender import DicomRunner as DicomRunner
    from node.destinations.dicom_sender import StoreResult as StoreResult
    from node.destinations.dicom_sender import Verdict as Verdict
    from node.destinations.dicom_sender import decompressed as decompressed
    from node.destinations.dicom_sender import judge as judge
    from node.pynetdicom_private import (
        keep_responses_from_the_reactor as keep_responses_from_the_reactor,
    )
    from node.spool import Spool


@dataclass(frozen=True)
class ClientTls:
    """DICOM TLS towards a peer: the CA that signed its certificate, and ours if it asks."""

    ca: Path
    certificate: Path | None = None
    private_key: Path | None = None


@dataclass(frozen=True)
class DicomDestination:
    name: str = field(metadata=INTERNAL)
    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    max_associations: int = 1
    instances_per_association: int = 500
    fallback: Literal["uncompressed", "fail"] = "uncompressed"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    storage_commitment: bool = False
    # Seconds to wait for the peer's N-EVENT-REPORT before the instances are sent again.
    commitment_timeout: float = 3600.0
    timeout: float = 30.0
    max_pdu: int = DEFAULT_MAX_PDU
    tls: ClientTls | None = None
    type: Literal["dicom"] = "dicom"


class DicomType(DestinationType[DicomDestination]):
    name = "dicom"
    settings = DicomDestination

    def parse(
        self, name: str, body: dict[str, Any], where: str, context: ParseContext
    ) -> DicomDestination:
        reject_unknown(body, where, yaml_keys(DicomDestination))
        d = defaults(DicomDestination)
        for key in ("host", "port", "ae_title"):
            if key not in body:
                raise ConfigError(f"{where}.{key}: required for a dicom destination")
        fallback = body.get("fallback", d["fallback"])
        if fallback not in ("uncompressed", "fail"):
            raise ConfigError(f"{where}.fallback: {fallback!r} is not one of uncompressed, fail")

        def number(key: str, minimum: int) -> int:
            return as_int(body.get(key, d[key]), f"{where}.{key}", minimum)

        def seconds(key: str) -> float:
            return as_duration(body.get(key, d[key]), f"{where}.{key}")

        return DicomDestination(
            name=name,
            host=as_host(body["host"], f"{where}.host"),
            port=as_port(body["port"], f"{where}.port"),
            ae_title=as_ae_title(body["ae_title"], f"{where}.ae_title"),
            calling_ae_title=as_ae_title(
                body.get("calling_ae_title", context.node_ae_title), f"{where}.calling_ae_title"
            ),
            max_associations=number("max_associations", 1),
            instances_per_association=number("instances_per_association", 1),
            fallback=fallback,
            retry=parse_retry(body.get("retry") or {}, f"{where}.retry"),
            storage_commitment=as_bool(
                body.get("storage_commitment", d["storage_commitment"]),
                f"{where}.storage_commitment",
            ),
            commitment_timeout=seconds("commitment_timeout"),
            timeout=seconds("timeout"),
            max_pdu=number("max_pdu", 4096),
            tls=_parse_client_tls(body["tls"], f"{where}.tls", context.base_dir)
            if body.get("tls")
            else None,
        )

    def describe(self, dest: DicomDestination) -> str:
        return (
            f"dicom {dest.ae_title}@{dest.host}:{dest.port} "
            f"(as {dest.calling_ae_title}, fallback {dest.fallback})"
        )

    def summary(self, dest: DicomDestination) -> str:
        return f"dicom {dest.ae_title}@{dest.host}:{dest.port}"

    def runner(self, dest: DicomDestination, spool: Spool) -> Runner:
        from node.destinations.dicom_sender import DicomRunner

        return DicomRunner(dest, spool)

    def echo(self, dest: DicomDestination, sop_class: str) -> str:
        from node.destinations.dicom_net import echo
        from node.scp import ACCEPTED_TRANSFER_SYNTAXES

        report = echo(dest, sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        sop = report.sop_class
        lines = [
            f"{dest.name}: C-ECHO to {dest.ae_title}@{dest.host}:{dest.port} succeeded "
            f"in {report.seconds * 1000:.0f} ms"
        ]
        if not report.accepted:
            lines.append(f"  {sop.name} ({sop}): not accepted with any transfer syntax")
            return "\n".join(lines)
        lines.append(f"  {sop.name} ({sop}) accepted as:")
        lines += [f"    {ts} {ts.name}" for ts in report.accepted]
        if report.refused:
            lines.append("  not accepted: " + ", ".join(ts.name for ts in report.refused))
        return "\n".join(lines)


TYPE = DicomType()


def _parse_client_tls(raw: Any, where: str, base_dir: Path) -> ClientTls:
    expect_mapping(raw, where)
    reject_unknown(raw, where, yaml_keys(ClientTls))
    if "ca" not in raw:
        raise ConfigError(
            f"{where}.ca: required: the CA certificate(s) that signed the peer's certificate"
        )
    if ("certificate" in raw) != ("private_key" in raw):
        raise ConfigError(f"{where}: give both certificate and private_key, or neither")
    files = {key: existing_file(raw[key], f"{where}.{key}", base_dir) for key in raw}
    return ClientTls(files["ca"], files.get("certificate"), files.get("private_key"))


# Names that lived here before the sender was split out (tests and benchmarks import them).
_MOVED = {
    "DicomRunner": "node.destinations.dicom_sender",
    "StoreResult": "node.destinations.dicom_sender",
    "Verdict": "node.destinations.dicom_sender",
    "decompressed": "node.destinations.dicom_sender",
    "judge": "node.destinations.dicom_sender",
    "AssociationFailed": "node.destinations.dicom_net",
    "ContextPlan": "node.destinations.dicom_net",
    "associate": "node.destinations.dicom_net",
    "echo": "node.destinations.dicom_net",
    "keep_responses_from_the_reactor": "node.pynetdicom_private",
    "new_ae": "node.destinations.dicom_net",
}


def __getattr__(name: str) -> Any:
    # Imported on first use, so that importing the type does not import pynetdicom's SCU.
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
