"""Loading and validating the YAML configuration into typed, immutable objects.

Every error names the exact place in the file (``rules[2].compress.transfer_syntax``)
so that an operator can fix it without reading code.

The dataclasses below are the schema: the keys a section accepts, their defaults and
the node settings that only a restart applies are read from their fields (a field's
``metadata`` gives its YAML ``key`` where that differs from the field name,
``internal`` for fields that are not keys, ``restart`` for settings a reload cannot
change). A ``compress:`` block is checked by the codecs' own
:func:`node.codecs.spec.parameter_problem`.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydicom.datadict import keyword_dict
from pydicom.uid import UID

from node.codecs.base import CompressSpec
from node.codecs.spec import SpecProblem, parameter_problem
from node.codecs.syntaxes import known_names, lookup_syntax
from node.destinations import DestinationSettings, ParseContext, destination_type

# Settings of the built-in destination types, where code written before the registry
# looks for them.
from node.destinations.dicom import ClientTls, DicomDestination
from node.destinations.folder import FolderDestination
from node.errors import ConfigError
from node.schema import (
    DEFAULT_MAX_PDU,
    INTERNAL,
    RESTART,
    IPNetwork,
    RetryPolicy,
    as_ae_title,
    as_bool,
    as_duration,
    as_host,
    as_int,
    as_network,
    as_number,
    as_path,
    as_patterns,
    as_port,
    as_size,
    defaults,
    existing_file,
    expect_mapping,
    kind_of,
    reject_unknown,
    yaml_keys,
)

DEFAULT_DRAIN_SECONDS = 10.0

__all__ = [
    "ClientTls",
    "Config",
    "DicomDestination",
    "FolderDestination",
    "LogLevel",
    "NodeSettings",
    "RetryPolicy",
    "Rule",
    "load_config",
    "parse_config",
]


# --------------------------------------------------------------------------- types


class LogLevel(StrEnum):
    """``node.log_level``; the values are the :mod:`logging` level names."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"

    @property
    def number(self) -> int:
        return int(logging.getLevelName(self.value))


@dataclass(frozen=True)
class Match:
    """AND of conditions; each condition's patterns are OR'ed (globs for strings)."""

    # DICOM keyword -> patterns; any keyword of the data dictionary is a key.
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = field(default=(), metadata=INTERNAL)
    calling_ae_title: tuple[str, ...] = ()
    called_ae_title: tuple[str, ...] = ()
    peer_networks: tuple[IPNetwork, ...] = field(default=(), metadata={"key": "peer_address"})


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    compress: CompressSpec | None  # None: send as received
    send_to: tuple[str, ...]


@dataclass(frozen=True)
class AllowEntry:
    """Callers that may associate: every condition given must hold (globs, networks)."""

    calling_ae_title: tuple[str, ...] = ()
    peer_networks: tuple[IPNetwork, ...] = field(default=(), metadata={"key": "peer_address"})


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 Annex B) on its own port."""

    port: int
    certificate: Path
    private_key: Path
    client_ca: Path | None = None  # set: clients must present a certificate signed by it


@dataclass(frozen=True)
class MetricsSettings:
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class ProxyProtocolSettings:
    """PROXY protocol (v1 and v2) on the DICOM and TLS ports, behind a load balancer.

    A connection from a ``trusted`` network (the balancers) must begin with a PROXY
    header; one from a ``direct`` network (a PACS that calls back with Storage
    Commitment reports) must not, and keeps its own address; any other is refused.
    """

    trusted: tuple[IPNetwork, ...]
    direct: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = field(default="DICOM-NODE", metadata=RESTART)
    host: str = field(default="0.0.0.0", metadata=RESTART)
    # None: no plain port (TLS only)
    port: int | None = field(default=11112, metadata=RESTART)
    spool: Path = field(default=Path("dicom-node-data/spool"), metadata=RESTART)
    workers: int = field(default=0, metadata=RESTART)  # 0 (``auto``) = one per CPU
    # Processes that accept associations on the same port (SO_REUSEPORT); 0 = ``auto``.
    receivers: int = field(default=1, metadata=RESTART)
    max_pdu: int = field(default=DEFAULT_MAX_PDU, metadata=RESTART)
    max_associations: int = 32
    log_level: LogLevel = LogLevel.INFO
    log_format: Literal["text", "json"] = field(default="text", metadata=RESTART)
    allow: tuple[AllowEntry, ...] = ()  # empty: any caller
    require_called_ae_title: bool = False
    tls: TlsSettings | None = field(default=None, metadata=RESTART)
    metrics: MetricsSettings | None = field(default=None, metadata=RESTART)
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    min_free_space: int = 64 * 1024 * 1024  # bytes the spool keeps free; below it: A700
    max_dataset_size: int = 2 * 1024**3  # a larger data set aborts its association
    proxy_protocol: ProxyProtocolSettings | None = None
    # Seconds /healthz answers 503 after SIGTERM before the listeners close; None: 10 s
    # when a load balancer can watch (metrics or proxy_protocol set), else 0.
    drain_seconds: float | None = None

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)

    @property
    def drain_window(self) -> float:
        if self.drain_seconds is not None:
            return self.drain_seconds
        watched = self.metrics is not None or self.proxy_protocol is not None
        return DEFAULT_DRAIN_SECONDS if watched else 0.0

    @property
    def receiver_count(self) -> int:
        """``auto``: one receiving process per 4 CPUs (docs/decisions.md#d26)."""
        return self.receivers or max(1, (os.cpu_count() or 1) // 4)


@dataclass(frozen=True)
class Config:
    node: NodeSettings
    destinations: dict[str, DestinationSettings]
    rules: tuple[Rule, ...]
    source: str = field(default="<embedded default>", metadata=INTERNAL)


# Node settings that need a new socket or process: a reload logs them as waiting.
RESTART_ONLY = tuple(f.name for f in fields(NodeSettings) if f.metadata.get("restart"))
# Keys of ``match`` that describe the association rather than the dataset.
ASSOCIATION_KEYS = yaml_keys(Match)
# Keys of a rule that are not fields of Rule: a default for its ``compress:`` block.
RULE_SHORTCUTS = ("new_uid_on_lossy",)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; ``None`` loads the embedded default."""
    if path is None:
        text = importlib.resources.files("node").joinpath("default.yaml").read_text("utf-8")
        return parse_config(text, base_dir=Path.cwd(), source="<embedded default>")
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from exc
    return parse_config(text, base_dir=p.resolve().parent, source=str(p))


def parse_config(text: str, base_dir: Path, source: str = "<string>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}:{where}: not valid YAML: {problem}") from exc
    if raw is None:
        raw = {}
    expect_mapping(raw, "(top level)")
    reject_unknown(raw, "(top level)", yaml_keys(Config))
    node = _parse_node(raw.get("node") or {}, base_dir)
    destinations = _parse_destinations(raw.get("destinations") or {}, base_dir, node)
    rules = _parse_rules(raw.get("rules"), destinations)
    return Config(node=node, destinations=destinations, rules=rules, source=source)


# --------------------------------------------------------------------------- sections


def _parse_node(raw: Any, base_dir: Path) -> NodeSettings:
    where = "node"
    expect_mapping(raw, where)
    reject_unknown(raw, where, yaml_keys(NodeSettings))
    d = NodeSettings()
    workers_raw = raw.get("workers", "auto")
    if workers_raw == "auto":
        workers = 0
    else:
        workers = as_int(workers_raw, f"{where}.workers", minimum=1, hint="or 'auto'")
    receivers_raw = raw.get("receivers", d.receivers)
    if receivers_raw == "auto":
        receivers = 0
    else:
        receivers = as_int(
            receivers_raw, f"{where}.receivers", minimum=1, maximum=64, hint="or 'auto'"
        )
    log_level = _log_level(raw.get("log_level", d.log_level), f"{where}.log_level")
    log_format = raw.get("log_format", d.log_format)
    if log_format not in ("text", "json"):
        raise ConfigError(f"{where}.log_format: {log_format!r} is not one of text, json")
    tls = _parse_tls(raw["tls"], f"{where}.tls", base_dir) if raw.get("tls") else None
    port = raw.get("port", d.port)
    if port is None and tls is None:
        raise ConfigError(f"{where}.port: may be null (no plain port) only when {where}.tls is set")
    return NodeSettings(
        ae_title=as_ae_title(raw.get("ae_title", d.ae_title), f"{where}.ae_title"),
        host=as_host(raw.get("host", d.host), f"{where}.host"),
        port=None if port is None else as_port(port, f"{where}.port"),
        log_format=log_format,
        allow=_parse_allow(raw.get("allow"), f"{where}.allow"),
        require_called_ae_title=as_bool(
            raw.get("require_called_ae_title", d.require_called_ae_title),
            f"{where}.require_called_ae_title",
        ),
        tls=tls,
        metrics=_parse_metrics(raw["metrics"], f"{where}.metrics") if raw.get("metrics") else None,
        acse_timeout=as_duration(raw.get("acse_timeout", d.acse_timeout), f"{where}.acse_timeout"),
        dimse_timeout=as_duration(
            raw.get("dimse_timeout", d.dimse_timeout), f"{where}.dimse_timeout"
        ),
        network_timeout=as_duration(
            raw.get("network_timeout", d.network_timeout), f"{where}.network_timeout"
        ),
        min_free_space=as_size(
            raw.get("min_free_space", d.min_free_space), f"{where}.min_free_space"
        ),
        max_dataset_size=as_size(
            raw.get("max_dataset_size", d.max_dataset_size), f"{where}.max_dataset_size"
        ),
        spool=as_path(raw.get("spool", str(d.spool)), f"{where}.spool", base_dir),
        workers=workers,
        receivers=receivers,
        proxy_protocol=_parse_proxy_protocol(raw["proxy_protocol"], f"{where}.proxy_protocol")
        if "proxy_protocol" in raw
        else None,
        drain_seconds=None
        if raw.get("drain_seconds") is None
        else _drain_seconds(raw["drain_seconds"], f"{where}.drain_seconds"),
        max_pdu=as_int(raw.get("max_pdu", d.max_pdu), f"{where}.max_pdu", minimum=4096),
        max_associations=as_int(
            raw.get("max_associations", d.max_associations),
            f"{where}.max_associations",
            minimum=1,
        ),
        log_level=log_level,
    )


def _parse_proxy_protocol(raw: Any, where: str) -> ProxyProtocolSettings:
    expect_mapping(raw, where)
    reject_unknown(raw, where, yaml_keys(ProxyProtocolSettings))
    if not isinstance(raw.get("trusted"), list) or not raw["trusted"]:
        raise ConfigError(
            f"{where}.trusted: required: a non-empty list of the load balancers' addresses "
            "or CIDR networks"
        )
    trusted = _network_list(raw["trusted"], f"{where}.trusted")
    direct = _network_list(raw.get("direct") or [], f"{where}.direct")
    for i, net in enumerate(direct):
        for j, other in enumerate(trusted):
            if net.overlaps(other):
                raise ConfigError(
                    f"{where}.direct[{i}]: {net} overlaps {where}.trusted[{j}] ({other}); "
                    "a caller either sends a PROXY header or does not"
                )
    return ProxyProtocolSettings(trusted=trusted, direct=direct)


def _network_list(raw: Any, where: str) -> tuple[IPNetwork, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of IP addresses or CIDR networks")
    networks = []
    for i, value in enumerate(raw):
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"{where}[{i}]: expected an IP address or CIDR network")
        networks.append(as_network(str(value), f"{where}[{i}]"))
    return tuple(networks)


def _drain_seconds(value: Any, where: str) -> float:
    """A duration, or 0 for no drain window."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return as_duration(value, where)


def _parse_allow(raw: Any, where: str) -> tuple[AllowEntry, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{where}: expected a non-empty list of callers; omit it to accept any caller"
        )
    entries = []
    for i, body in enumerate(raw):
        place = f"{where}[{i}]"
        expect_mapping(body, place)
        reject_unknown(body, place, yaml_keys(AllowEntry))
        if not body:
            raise ConfigError(f"{place}: name a calling_ae_title, a peer_address, or both")
        titles = (
            as_patterns(body["calling_ae_title"], f"{place}.calling_ae_title")
            if "calling_ae_title" in body
            else ()
        )
        networks = (
            tuple(
                as_network(p, f"{place}.peer_address")
                for p in as_patterns(body["peer_address"], f"{place}.peer_address")
            )
            if "peer_address" in body
            else ()
        )
        entries.append(AllowEntry(titles, networks))
    return tuple(entries)


def _parse_tls(raw: Any, where: str, base_dir: Path) -> TlsSettings:
    expect_mapping(raw, where)
    reject_unknown(raw, where, yaml_keys(TlsSettings))
    for key in ("port", "certificate", "private_key"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: required for DICOM TLS")
    client_ca = raw.get("client_ca")
    return TlsSettings(
        port=as_port(raw["port"], f"{where}.port"),
        certificate=existing_file(raw["certificate"], f"{where}.certificate", base_dir),
        private_key=existing_file(raw["private_key"], f"{where}.private_key", base_dir),
        client_ca=None
        if client_ca is None
        else existing_file(client_ca, f"{where}.client_ca", base_dir),
    )


def _parse_metrics(raw: Any, where: str) -> MetricsSettings:
    expect_mapping(raw, where)
    reject_unknown(raw, where, yaml_keys(MetricsSettings))
    d = MetricsSettings()
    return MetricsSettings(
        host=as_host(raw.get("host", d.host), f"{where}.host"),
        port=as_port(raw.get("port", d.port), f"{where}.port"),
    )


def _parse_destinations(
    raw: Any, base_dir: Path, node: NodeSettings
) -> dict[str, DestinationSettings]:
    expect_mapping(raw, "destinations")
    context = ParseContext(base_dir=base_dir, node_ae_title=node.ae_title)
    result: dict[str, DestinationSettings] = {}
    for name, body in raw.items():
        where = f"destinations.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(
                f"{where}: destination names may hold only letters, digits, '_', '.' and '-'"
            )
        expect_mapping(body, where)
        kind = destination_type(body.get("type"), f"{where}.type")
        result[name] = kind.parse(name, body, where, context)
    return result


def _parse_rules(raw: Any, destinations: dict[str, DestinationSettings]) -> tuple[Rule, ...]:
    if raw is None:
        raise ConfigError(
            "rules: at least one rule is required (a rule without match matches everything)"
        )
    if not isinstance(raw, list):
        raise ConfigError(f"rules: expected a list of rules, got {kind_of(raw)}")
    rules: list[Rule] = []
    names: set[str] = set()
    for index, body in enumerate(raw):
        where = f"rules[{index}]"
        expect_mapping(body, where)
        reject_unknown(body, where, yaml_keys(Rule) + RULE_SHORTCUTS)
        name = str(body.get("name", f"rule-{index}"))
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used by an earlier rule")
        names.add(name)
        new_uid_default = as_bool(
            body.get("new_uid_on_lossy", _COMPRESS_DEFAULTS["new_uid_on_lossy"]),
            f"{where}.new_uid_on_lossy",
        )
        rules.append(
            Rule(
                name=name,
                match=_parse_match(body.get("match") or {}, f"{where}.match"),
                compress=_parse_compress(
                    body.get("compress"), f"{where}.compress", new_uid_default
                ),
                send_to=_parse_send_to(body.get("send_to"), f"{where}.send_to", destinations),
            )
        )
    return tuple(rules)


def _parse_match(raw: Any, where: str) -> Match:
    expect_mapping(raw, where)
    attributes: list[tuple[str, tuple[str, ...]]] = []
    calling: tuple[str, ...] = ()
    called: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    for key, value in raw.items():
        patterns = as_patterns(value, f"{where}.{key}")
        if key == "calling_ae_title":
            calling = patterns
        elif key == "called_ae_title":
            called = patterns
        elif key == "peer_address":
            networks = tuple(as_network(p, f"{where}.peer_address") for p in patterns)
        elif key in keyword_dict:
            if key == "PixelData":
                raise ConfigError(f"{where}.PixelData: rules cannot match on pixel data")
            attributes.append((key, patterns))
        else:
            raise ConfigError(
                f"{where}.{key}: not a DICOM keyword (e.g. Modality, StationName) nor one of "
                f"{', '.join(ASSOCIATION_KEYS)}"
            )
    return Match(tuple(attributes), calling, called, networks)


_COMPRESS_DEFAULTS = defaults(CompressSpec)
# The encoder parameters a syntax may take (SyntaxInfo.parameters names them).
_ENCODER_PARAMETERS = ("max_error", "compression_ratio", "psnr", "quality")


def _parse_compress(raw: Any, where: str, new_uid_default: bool) -> CompressSpec | None:
    if raw is None:
        return None
    expect_mapping(raw, where)
    reject_unknown(raw, where, yaml_keys(CompressSpec))
    if "transfer_syntax" not in raw:
        raise ConfigError(f"{where}.transfer_syntax: required; known: {', '.join(known_names())}")
    info = lookup_syntax(str(raw["transfer_syntax"]))
    if info is None:
        raise ConfigError(
            f"{where}.transfer_syntax: {raw['transfer_syntax']!r} is not a known transfer syntax; "
            f"known: {', '.join(known_names())}"
        )
    for param in _ENCODER_PARAMETERS:
        if param in raw and param not in info.parameters:
            allowed = ", ".join(info.parameters) or "none"
            raise ConfigError(
                f"{where}.{param}: not a parameter of {info.name} (its parameters: {allowed})"
            )
    if "max_error" in info.parameters and "max_error" not in raw:
        raise ConfigError(f"{where}.max_error: required for {info.name} (e.g. 2)")
    if "compression_ratio" in info.parameters and ("compression_ratio" in raw) == ("psnr" in raw):
        raise ConfigError(f"{where}: {info.name} needs exactly one of compression_ratio, psnr")
    plugin = raw.get("plugin")
    spec = CompressSpec(
        transfer_syntax=UID(info.uid),
        plugin=None if plugin is None else str(plugin),
        max_error=_optional(raw, "max_error", as_int, where),
        compression_ratio=_optional(raw, "compression_ratio", as_number, where),
        psnr=_optional(raw, "psnr", as_number, where),
        quality=_optional(raw, "quality", as_int, where),
        new_uid_on_lossy=as_bool(
            raw.get("new_uid_on_lossy", new_uid_default), f"{where}.new_uid_on_lossy"
        ),
        verify_lossless=as_bool(
            raw.get("verify", _COMPRESS_DEFAULTS["verify_lossless"]), f"{where}.verify"
        ),
        allow_lossy_recompression=as_bool(
            raw.get("allow_lossy_recompression", _COMPRESS_DEFAULTS["allow_lossy_recompression"]),
            f"{where}.allow_lossy_recompression",
        ),
    )
    problem = parameter_problem(spec) or (_plugin_problem(spec) if spec.plugin else None)
    if problem is not None:
        raise ConfigError(spec_error(problem, where))
    return spec


def spec_error(problem: SpecProblem, where: str) -> str:
    """A codec's objection to a ``compress:`` block at ``where``, as a config error."""
    return (
        f"{where}.{problem.key}: {problem.detail}" if problem.key else f"{where}: {problem.detail}"
    )


def _optional(raw: dict[str, Any], key: str, parse: Any, where: str) -> Any:
    return parse(raw[key], f"{where}.{key}") if key in raw else None


def _plugin_problem(spec: CompressSpec) -> SpecProblem | None:
    # Imported late: finding out which encoders are installed imports them.
    from node.codecs.spec import encoder_problem

    return encoder_problem(spec)


def _parse_send_to(
    raw: Any, where: str, destinations: dict[str, DestinationSettings]
) -> tuple[str, ...]:
    if raw is None:
        raise ConfigError(
            f"{where}: required; name one or more of: {', '.join(destinations) or '(none defined)'}"
        )
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{where}: expected a destination name or a non-empty list of them")
    for i, name in enumerate(names):
        if name not in destinations:
            raise ConfigError(
                f"{where}[{i}]: {name!r} is not a defined destination; defined: "
                f"{', '.join(destinations) or '(none)'}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: a destination is named twice")
    return tuple(str(n) for n in names)


def _log_level(value: Any, where: str) -> LogLevel:
    text = str(value).upper()
    try:
        return LogLevel(text)
    except ValueError:
        raise ConfigError(
            f"{where}: {text!r} is not one of {', '.join(level.value for level in LogLevel)}"
        ) from None
