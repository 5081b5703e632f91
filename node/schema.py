"""Typed values out of YAML: the building blocks of every config section.

Each reader takes the raw YAML value and its place (``destinations.pacs.port``) and
returns a typed value or raises :class:`~node.errors.ConfigError` naming that place.
The dataclass helpers read a section's keys and defaults from its fields (a field's
``metadata``: ``key`` where the YAML key differs from the field name, ``internal``
for fields that are not keys, ``restart`` for node settings a reload cannot change).
Destination types (:mod:`node.destinations`) build their settings from these too.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from node.errors import ConfigError

AE_TITLE_MAX = 16
DEFAULT_MAX_PDU = 1_048_576
INTERNAL = {"internal": True}  # a field that is not a YAML key
RESTART = {"restart": True}  # a node setting that a reload cannot change

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff (with jitter) between ``initial`` and ``max`` seconds."""

    initial: float = 10.0
    max: float = 1800.0
    give_up_after: float = 7 * 86400.0
    multiplier: float = 2.0


def yaml_keys(cls: type) -> tuple[str, ...]:
    """The keys a config section of dataclass ``cls`` accepts, in field order."""
    return tuple(
        f.metadata.get("key", f.name) for f in fields(cls) if not f.metadata.get("internal")
    )


def defaults(cls: type) -> dict[str, Any]:
    """Field name -> default value, for the fields of ``cls`` that have one."""
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def parse_retry(raw: Any, where: str) -> RetryPolicy:
    expect_mapping(raw, where)
    reject_unknown(raw, where, yaml_keys(RetryPolicy))
    d = RetryPolicy()
    policy = RetryPolicy(
        initial=as_duration(raw.get("initial", d.initial), f"{where}.initial"),
        max=as_duration(raw.get("max", d.max), f"{where}.max"),
        give_up_after=as_duration(
            raw.get("give_up_after", d.give_up_after), f"{where}.give_up_after"
        ),
        multiplier=as_number(
            raw.get("multiplier", d.multiplier), f"{where}.multiplier", minimum=1.0
        ),
    )
    if policy.max < policy.initial:
        raise ConfigError(f"{where}.max: must not be shorter than {where}.initial")
    return policy


def existing_file(value: Any, where: str, base_dir: Path) -> Path:
    path = as_path(value, where, base_dir)
    if not path.is_file():
        raise ConfigError(f"{where}: {path} does not exist or is not a file")
    return path


def kind_of(value: Any) -> str:
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)


def expect_mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value), got {kind_of(value)}")


def reject_unknown(raw: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    for key in raw:
        if key not in known:
            prefix = "" if where == "(top level)" else f"{where}."
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of: {', '.join(known)}")


def as_int(
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


def as_number(value: Any, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}, got {value}")
    return float(value)


def as_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def as_port(value: Any, where: str) -> int:
    return as_int(value, where, minimum=1, maximum=65535)


def as_host(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a host name or IP address, got {value!r}")
    return value.strip()


def as_ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected an AE title (text), got {value!r}")
    title = value.strip()
    if not title or len(title) > AE_TITLE_MAX:
        raise ConfigError(f"{where}: an AE title has 1 to {AE_TITLE_MAX} characters, got {value!r}")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ConfigError(f"{where}: an AE title may not hold '\\' or control characters")
    return title


def as_path(value: Any, where: str, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def as_duration(value: Any, where: str) -> float:
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


def as_size(value: Any, where: str) -> int:
    """Bytes from ``1048576``, ``512MB`` or ``2GiB``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{where}: {value!r} is not a size; use e.g. 0, 512MB, 2GiB")
    return int(float(m.group(1)) * _UNIT_BYTES[(m.group(2) or "b").lower()])


def as_patterns(value: Any, where: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{where}: an empty list matches nothing; remove the key or add values")
    out = []
    for v in values:
        if isinstance(v, dict | list) or v is None:
            raise ConfigError(f"{where}: expected text or a list of texts, got {kind_of(v)}")
        out.append(str(v))
    return tuple(out)


def as_network(value: str, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not an IP address or CIDR network") from exc
