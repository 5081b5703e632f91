"""Loading and validating the YAML configuration into typed, immutable objects.

Every error names the exact place in the file (``rules[2].compress.transfer_syntax``)
so that an operator can fix it without reading code.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydicom.datadict import keyword_dict
from pydicom.uid import UID

from node.codecs.base import CompressSpec
from node.codecs.syntaxes import known_names, lookup_syntax
from node.errors import ConfigError

DEFAULT_MAX_PDU = 1_048_576
AE_TITLE_MAX = 16
DEFAULT_DRAIN_SECONDS = 10.0
# Keys of ``match`` that describe the association rather than the dataset.
ASSOCIATION_KEYS = ("calling_ae_title", "called_ae_title", "peer_address")


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff (with jitter) between ``initial`` and ``max`` seconds."""

    initial: float = 10.0
    max: float = 1800.0
    give_up_after: float = 7 * 86400.0
    multiplier: float = 2.0


@dataclass(frozen=True)
class FolderDestination:
    name: str
    path: Path
    layout: str = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    type: Literal["folder"] = "folder"


@dataclass(frozen=True)
class ClientTls:
    """DICOM TLS towards a peer: the CA that signed its certificate, and ours if it asks."""

    ca: Path
    certificate: Path | None = None
    private_key: Path | None = None


@dataclass(frozen=True)
class DicomDestination:
    name: str
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


Destination = FolderDestination | DicomDestination


@dataclass(frozen=True)
class Match:
    """AND of conditions; each condition's patterns are OR'ed (globs for strings)."""

    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    calling_ae_title: tuple[str, ...] = ()
    called_ae_title: tuple[str, ...] = ()
    peer_networks: tuple[str, ...] = ()  # IP networks in CIDR form


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
    peer_networks: tuple[str, ...] = ()


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

    trusted: tuple[str, ...]  # IP networks in CIDR form
    direct: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "DICOM-NODE"
    host: str = "0.0.0.0"
    port: int | None = 11112  # None: no plain port (TLS only)
    spool: Path = Path("dicom-node-data/spool")
    workers: int = 0  # 0 = one per CPU
    max_pdu: int = DEFAULT_MAX_PDU
    max_associations: int = 32
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    allow: tuple[AllowEntry, ...] = ()  # empty: any caller
    require_called_ae_title: bool = False
    tls: TlsSettings | None = None
    metrics: MetricsSettings | None = None
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


@dataclass(frozen=True)
class Config:
    node: NodeSettings
    destinations: dict[str, Destination]
    rules: tuple[Rule, ...]
    source: str = "<embedded default>"


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
    _expect_mapping(raw, "(top level)")
    _reject_unknown(raw, "(top level)", ("node", "destinations", "rules"))
    node = _parse_node(raw.get("node") or {}, base_dir)
    destinations = _parse_destinations(raw.get("destinations") or {}, base_dir, node)
    rules = _parse_rules(raw.get("rules"), destinations)
    return Config(node=node, destinations=destinations, rules=rules, source=source)


# --------------------------------------------------------------------------- sections


def _parse_node(raw: Any, base_dir: Path) -> NodeSettings:
    where = "node"
    _expect_mapping(raw, where)
    _reject_unknown(
        raw,
        where,
        (
            "ae_title",
            "host",
            "port",
            "spool",
            "workers",
            "max_pdu",
            "max_associations",
            "log_level",
            "log_format",
            "allow",
            "require_called_ae_title",
            "tls",
            "metrics",
            "acse_timeout",
            "dimse_timeout",
            "network_timeout",
            "min_free_space",
            "max_dataset_size",
            "proxy_protocol",
            "drain_seconds",
        ),
    )
    defaults = NodeSettings()
    workers_raw = raw.get("workers", "auto")
    if workers_raw == "auto":
        workers = 0
    else:
        workers = _int(workers_raw, f"{where}.workers", minimum=1, hint="or 'auto'")
    log_level = str(raw.get("log_level", defaults.log_level)).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f"{where}.log_level: {log_level!r} is not one of DEBUG, INFO, WARNING, ERROR"
        )
    log_format = raw.get("log_format", defaults.log_format)
    if log_format not in ("text", "json"):
        raise ConfigError(f"{where}.log_format: {log_format!r} is not one of text, json")
    tls = _parse_tls(raw["tls"], f"{where}.tls", base_dir) if raw.get("tls") else None
    port = raw.get("port", defaults.port)
    if port is None and tls is None:
        raise ConfigError(f"{where}.port: may be null (no plain port) only when {where}.tls is set")
    return NodeSettings(
        ae_title=_ae_title(raw.get("ae_title", defaults.ae_title), f"{where}.ae_title"),
        host=_host(raw.get("host", defaults.host), f"{where}.host"),
        port=None if port is None else _port(port, f"{where}.port"),
        log_format=log_format,
        allow=_parse_allow(raw.get("allow"), f"{where}.allow"),
        require_called_ae_title=_bool(
            raw.get("require_called_ae_title", False), f"{where}.require_called_ae_title"
        ),
        tls=tls,
        metrics=_parse_metrics(raw["metrics"], f"{where}.metrics") if raw.get("metrics") else None,
        acse_timeout=_duration(
            raw.get("acse_timeout", defaults.acse_timeout), f"{where}.acse_timeout"
        ),
        dimse_timeout=_duration(
            raw.get("dimse_timeout", defaults.dimse_timeout), f"{where}.dimse_timeout"
        ),
        network_timeout=_duration(
            raw.get("network_timeout", defaults.network_timeout), f"{where}.network_timeout"
        ),
        min_free_space=_bytes(
            raw.get("min_free_space", defaults.min_free_space), f"{where}.min_free_space"
        ),
        max_dataset_size=_bytes(
            raw.get("max_dataset_size", defaults.max_dataset_size), f"{where}.max_dataset_size"
        ),
        spool=_path(raw.get("spool", str(defaults.spool)), f"{where}.spool", base_dir),
        workers=workers,
        max_pdu=_int(raw.get("max_pdu", defaults.max_pdu), f"{where}.max_pdu", minimum=4096),
        max_associations=_int(
            raw.get("max_associations", defaults.max_associations),
            f"{where}.max_associations",
            minimum=1,
        ),
        log_level=log_level,
        proxy_protocol=_parse_proxy_protocol(raw["proxy_protocol"], f"{where}.proxy_protocol")
        if "proxy_protocol" in raw
        else None,
        drain_seconds=None
        if raw.get("drain_seconds") is None
        else _drain_seconds(raw["drain_seconds"], f"{where}.drain_seconds"),
    )


def _parse_proxy_protocol(raw: Any, where: str) -> ProxyProtocolSettings:
    _expect_mapping(raw, where)
    _reject_unknown(raw, where, ("trusted", "direct"))
    if not isinstance(raw.get("trusted"), list) or not raw["trusted"]:
        raise ConfigError(
            f"{where}.trusted: required: a non-empty list of the load balancers' addresses "
            "or CIDR networks"
        )
    trusted = _network_list(raw["trusted"], f"{where}.trusted")
    direct = _network_list(raw.get("direct") or [], f"{where}.direct")
    for i, net in enumerate(direct):
        for j, other in enumerate(trusted):
            if ipaddress.ip_network(net).overlaps(ipaddress.ip_network(other)):
                raise ConfigError(
                    f"{where}.direct[{i}]: {net} overlaps {where}.trusted[{j}] ({other}); "
                    "a caller either sends a PROXY header or does not"
                )
    return ProxyProtocolSettings(trusted=trusted, direct=direct)


def _network_list(raw: Any, where: str) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: expected a list of IP addresses or CIDR networks")
    networks = []
    for i, value in enumerate(raw):
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"{where}[{i}]: expected an IP address or CIDR network")
        networks.append(_network(str(value), f"{where}[{i}]"))
    return tuple(networks)


def _drain_seconds(value: Any, where: str) -> float:
    """A duration, or 0 for no drain window."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return _duration(value, where)


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
        _expect_mapping(body, place)
        _reject_unknown(body, place, ("calling_ae_title", "peer_address"))
        if not body:
            raise ConfigError(f"{place}: name a calling_ae_title, a peer_address, or both")
        titles = (
            _patterns(body["calling_ae_title"], f"{place}.calling_ae_title")
            if "calling_ae_title" in body
            else ()
        )
        networks = (
            tuple(
                _network(p, f"{place}.peer_address")
                for p in _patterns(body["peer_address"], f"{place}.peer_address")
            )
            if "peer_address" in body
            else ()
        )
        entries.append(AllowEntry(titles, networks))
    return tuple(entries)


def _parse_tls(raw: Any, where: str, base_dir: Path) -> TlsSettings:
    _expect_mapping(raw, where)
    _reject_unknown(raw, where, ("port", "certificate", "private_key", "client_ca"))
    for key in ("port", "certificate", "private_key"):
        if key not in raw:
            raise ConfigError(f"{where}.{key}: required for DICOM TLS")
    client_ca = raw.get("client_ca")
    return TlsSettings(
        port=_port(raw["port"], f"{where}.port"),
        certificate=_existing_file(raw["certificate"], f"{where}.certificate", base_dir),
        private_key=_existing_file(raw["private_key"], f"{where}.private_key", base_dir),
        client_ca=None
        if client_ca is None
        else _existing_file(client_ca, f"{where}.client_ca", base_dir),
    )


def _parse_metrics(raw: Any, where: str) -> MetricsSettings:
    _expect_mapping(raw, where)
    _reject_unknown(raw, where, ("host", "port"))
    defaults = MetricsSettings()
    return MetricsSettings(
        host=_host(raw.get("host", defaults.host), f"{where}.host"),
        port=_port(raw.get("port", defaults.port), f"{where}.port"),
    )


def _parse_destinations(raw: Any, base_dir: Path, node: NodeSettings) -> dict[str, Destination]:
    _expect_mapping(raw, "destinations")
    result: dict[str, Destination] = {}
    for name, body in raw.items():
        where = f"destinations.{name}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(
                f"{where}: destination names may hold only letters, digits, '_', '.' and '-'"
            )
        _expect_mapping(body, where)
        kind = body.get("type")
        if kind == "folder":
            result[name] = _parse_folder(name, body, where, base_dir)
        elif kind == "dicom":
            result[name] = _parse_dicom(name, body, where, node, base_dir)
        else:
            raise ConfigError(
                f"{where}.type: {kind!r} is not a destination type; known: folder, dicom"
            )
    return result


def _parse_folder(name: str, body: dict[str, Any], where: str, base_dir: Path) -> FolderDestination:
    _reject_unknown(body, where, ("type", "path", "layout"))
    if "path" not in body:
        raise ConfigError(f"{where}.path: required for a folder destination")
    layout = body.get("layout", FolderDestination.layout)
    _validate_layout(layout, f"{where}.layout")
    return FolderDestination(
        name=name, path=_path(body["path"], f"{where}.path", base_dir), layout=layout
    )


def _parse_dicom(
    name: str, body: dict[str, Any], where: str, node: NodeSettings, base_dir: Path
) -> DicomDestination:
    _reject_unknown(
        body,
        where,
        (
            "type",
            "host",
            "port",
            "ae_title",
            "calling_ae_title",
            "max_associations",
            "instances_per_association",
            "fallback",
            "retry",
            "storage_commitment",
            "commitment_timeout",
            "timeout",
            "max_pdu",
            "tls",
        ),
    )
    for key in ("host", "port", "ae_title"):
        if key not in body:
            raise ConfigError(f"{where}.{key}: required for a dicom destination")
    fallback = body.get("fallback", "uncompressed")
    if fallback not in ("uncompressed", "fail"):
        raise ConfigError(f"{where}.fallback: {fallback!r} is not one of uncompressed, fail")
    return DicomDestination(
        name=name,
        host=_host(body["host"], f"{where}.host"),
        port=_port(body["port"], f"{where}.port"),
        ae_title=_ae_title(body["ae_title"], f"{where}.ae_title"),
        calling_ae_title=_ae_title(
            body.get("calling_ae_title", node.ae_title), f"{where}.calling_ae_title"
        ),
        max_associations=_int(body.get("max_associations", 1), f"{where}.max_associations", 1),
        instances_per_association=_int(
            body.get("instances_per_association", 500), f"{where}.instances_per_association", 1
        ),
        fallback=fallback,
        retry=_parse_retry(body.get("retry") or {}, f"{where}.retry"),
        storage_commitment=_bool(
            body.get("storage_commitment", False), f"{where}.storage_commitment"
        ),
        commitment_timeout=_duration(
            body.get("commitment_timeout", 3600), f"{where}.commitment_timeout"
        ),
        timeout=_duration(body.get("timeout", 30), f"{where}.timeout"),
        max_pdu=_int(body.get("max_pdu", DEFAULT_MAX_PDU), f"{where}.max_pdu", minimum=4096),
        tls=_parse_client_tls(body["tls"], f"{where}.tls", base_dir) if body.get("tls") else None,
    )


def _parse_client_tls(raw: Any, where: str, base_dir: Path) -> ClientTls:
    _expect_mapping(raw, where)
    _reject_unknown(raw, where, ("ca", "certificate", "private_key"))
    if "ca" not in raw:
        raise ConfigError(
            f"{where}.ca: required: the CA certificate(s) that signed the peer's certificate"
        )
    if ("certificate" in raw) != ("private_key" in raw):
        raise ConfigError(f"{where}: give both certificate and private_key, or neither")
    files = {key: _existing_file(raw[key], f"{where}.{key}", base_dir) for key in raw}
    return ClientTls(files["ca"], files.get("certificate"), files.get("private_key"))


def _existing_file(value: Any, where: str, base_dir: Path) -> Path:
    path = _path(value, where, base_dir)
    if not path.is_file():
        raise ConfigError(f"{where}: {path} does not exist or is not a file")
    return path


def _parse_retry(raw: Any, where: str) -> RetryPolicy:
    _expect_mapping(raw, where)
    _reject_unknown(raw, where, ("initial", "max", "give_up_after", "multiplier"))
    d = RetryPolicy()
    policy = RetryPolicy(
        initial=_duration(raw.get("initial", d.initial), f"{where}.initial"),
        max=_duration(raw.get("max", d.max), f"{where}.max"),
        give_up_after=_duration(
            raw.get("give_up_after", d.give_up_after), f"{where}.give_up_after"
        ),
        multiplier=_number(raw.get("multiplier", d.multiplier), f"{where}.multiplier", minimum=1.0),
    )
    if policy.max < policy.initial:
        raise ConfigError(f"{where}.max: must not be shorter than {where}.initial")
    return policy


def _parse_rules(raw: Any, destinations: dict[str, Destination]) -> tuple[Rule, ...]:
    if raw is None:
        raise ConfigError(
            "rules: at least one rule is required (a rule without match matches everything)"
        )
    if not isinstance(raw, list):
        raise ConfigError(f"rules: expected a list of rules, got {_kind(raw)}")
    rules: list[Rule] = []
    names: set[str] = set()
    for index, body in enumerate(raw):
        where = f"rules[{index}]"
        _expect_mapping(body, where)
        _reject_unknown(body, where, ("name", "match", "compress", "send_to", "new_uid_on_lossy"))
        name = str(body.get("name", f"rule-{index}"))
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used by an earlier rule")
        names.add(name)
        new_uid_default = _bool(body.get("new_uid_on_lossy", True), f"{where}.new_uid_on_lossy")
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
    _expect_mapping(raw, where)
    attributes: list[tuple[str, tuple[str, ...]]] = []
    calling: tuple[str, ...] = ()
    called: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    for key, value in raw.items():
        patterns = _patterns(value, f"{where}.{key}")
        if key == "calling_ae_title":
            calling = patterns
        elif key == "called_ae_title":
            called = patterns
        elif key == "peer_address":
            networks = tuple(_network(p, f"{where}.peer_address") for p in patterns)
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


def _parse_compress(raw: Any, where: str, new_uid_default: bool) -> CompressSpec | None:
    if raw is None:
        return None
    _expect_mapping(raw, where)
    _reject_unknown(
        raw,
        where,
        (
            "transfer_syntax",
            "plugin",
            "max_error",
            "compression_ratio",
            "psnr",
            "quality",
            "new_uid_on_lossy",
            "verify",
            "allow_lossy_recompression",
        ),
    )
    if "transfer_syntax" not in raw:
        raise ConfigError(f"{where}.transfer_syntax: required; known: {', '.join(known_names())}")
    info = lookup_syntax(str(raw["transfer_syntax"]))
    if info is None:
        raise ConfigError(
            f"{where}.transfer_syntax: {raw['transfer_syntax']!r} is not a known transfer syntax; "
            f"known: {', '.join(known_names())}"
        )
    for param in ("max_error", "compression_ratio", "psnr", "quality"):
        if param in raw and param not in info.parameters:
            allowed = ", ".join(info.parameters) or "none"
            raise ConfigError(
                f"{where}.{param}: not a parameter of {info.name} (its parameters: {allowed})"
            )
    max_error = compression_ratio = psnr = None
    if "max_error" in info.parameters:
        if "max_error" not in raw:
            raise ConfigError(f"{where}.max_error: required for {info.name} (e.g. 2)")
        max_error = _int(raw["max_error"], f"{where}.max_error", minimum=0, maximum=255)
    if "compression_ratio" in info.parameters:
        if ("compression_ratio" in raw) == ("psnr" in raw):
            raise ConfigError(f"{where}: {info.name} needs exactly one of compression_ratio, psnr")
        if "compression_ratio" in raw:
            compression_ratio = _number(raw["compression_ratio"], f"{where}.compression_ratio", 1.0)
        else:
            psnr = _number(raw["psnr"], f"{where}.psnr", minimum=1.0)
    quality = None
    if "quality" in raw:  # jpeg-baseline; the codec's default (90) otherwise
        quality = _int(raw["quality"], f"{where}.quality", minimum=1, maximum=100)
    plugin = raw.get("plugin")
    if plugin is not None:
        plugin = str(plugin)
        problem = _plugin_problem(info.uid, plugin)
        if problem:
            raise ConfigError(f"{where}.plugin: {problem}")
    return CompressSpec(
        transfer_syntax=UID(info.uid),
        plugin=plugin,
        max_error=max_error,
        compression_ratio=compression_ratio,
        psnr=psnr,
        quality=quality,
        new_uid_on_lossy=_bool(
            raw.get("new_uid_on_lossy", new_uid_default), f"{where}.new_uid_on_lossy"
        ),
        verify_lossless=_bool(raw.get("verify", False), f"{where}.verify"),
        allow_lossy_recompression=_bool(
            raw.get("allow_lossy_recompression", False), f"{where}.allow_lossy_recompression"
        ),
    )


def _plugin_problem(uid: UID, plugin: str) -> str | None:
    # Imported late: the codec registry imports the encoder packages.
    from node.codecs import check_plugin

    return check_plugin(uid, plugin)


def _parse_send_to(raw: Any, where: str, destinations: dict[str, Destination]) -> tuple[str, ...]:
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


# --------------------------------------------------------------------------- scalars


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _expect_mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value), got {_kind(value)}")


def _reject_unknown(raw: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    for key in raw:
        if key not in known:
            prefix = "" if where == "(top level)" else f"{where}."
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of: {', '.join(known)}")


def _int(
    value: Any, where: str, minimum: int | None = None, maximum: int | None = None, hint: str = ""
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        extra = f" {hint}" if hint else ""
        raise ConfigError(f"{where}: expected a whole number{extra}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where}: must be at most {maximum}, got {value}")
    return value


def _number(value: Any, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}, got {value}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _port(value: Any, where: str) -> int:
    return _int(value, where, minimum=1, maximum=65535)


def _host(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a host name or IP address, got {value!r}")
    return value.strip()


def _ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected an AE title (text), got {value!r}")
    title = value.strip()
    if not title or len(title) > AE_TITLE_MAX:
        raise ConfigError(f"{where}: an AE title has 1 to {AE_TITLE_MAX} characters, got {value!r}")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ConfigError(f"{where}: an AE title may not hold '\\' or control characters")
    return title


def _path(value: Any, where: str, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def _duration(value: Any, where: str) -> float:
    """Seconds from ``90``, ``10s``, ``30m``, ``2h`` or ``7d``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(
                f"{where}: {value!r} is not a duration; use e.g. 30, 10s, 30m, 2h, 7d"
            )
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{where}: must be longer than zero")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _bytes(value: Any, where: str) -> int:
    """Bytes from ``1048576``, ``512MB`` or ``2GiB``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{where}: {value!r} is not a size; use e.g. 0, 512MB, 2GiB")
    return int(float(m.group(1)) * _UNIT_BYTES[(m.group(2) or "b").lower()])


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}: an empty list matches nothing; remove the key or add values")
    out = []
    for v in values:
        if isinstance(v, dict | list) or v is None:
            raise ConfigError(f"{where}: expected text or a list of texts, got {_kind(v)}")
        out.append(str(v))
    return tuple(out)


def _network(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not an IP address or CIDR network") from exc


_LAYOUT_FIELD = re.compile(r"\{([^{}]*)\}")


def _validate_layout(layout: Any, where: str) -> None:
    if not isinstance(layout, str) or not layout.strip():
        raise ConfigError(
            f"{where}: expected a path template such as '{{PatientID}}/{{SOPInstanceUID}}.dcm'"
        )
    fields = _LAYOUT_FIELD.findall(layout)
    if "{" in _LAYOUT_FIELD.sub("", layout) or "}" in _LAYOUT_FIELD.sub("", layout):
        raise ConfigError(f"{where}: unbalanced braces in {layout!r}")
    for name in fields:
        if name not in keyword_dict:
            raise ConfigError(f"{where}: {{{name}}} is not a DICOM keyword (e.g. PatientID)")
    if "SOPInstanceUID" not in fields:
        raise ConfigError(
            f"{where}: must contain {{SOPInstanceUID}} so that each instance gets its own file"
        )
    if layout.startswith("/") or ".." in Path(_LAYOUT_FIELD.sub("x", layout)).parts:
        raise ConfigError(f"{where}: must be a relative path below the destination's path")
