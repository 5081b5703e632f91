"""Which rule an instance falls under: first match wins.

Matching reads header attributes only; it never touches Pixel Data.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.config import Match, Rule
from node.schema import IPNetwork

_URL = re.compile(r"^dicom://\[?(?P<host>[^\]]*?)\]?:(?P<port>\d+)$")


@dataclass(frozen=True)
class Origin:
    """Who sent an instance, as recorded in its spool file's meta."""

    calling_ae_title: str = ""
    called_ae_title: str = ""
    peer_address: str = ""

    @classmethod
    def from_file_meta(cls, meta: Dataset) -> Origin:
        url = str(meta.get("SendingPresentationAddress", "") or "")
        m = _URL.match(url)
        return cls(
            calling_ae_title=str(meta.get("SendingApplicationEntityTitle", "") or "").strip(),
            called_ae_title=str(meta.get("ReceivingApplicationEntityTitle", "") or "").strip(),
            peer_address=m.group("host") if m else "",
        )


def first_match(rules: tuple[Rule, ...], ds: Dataset, origin: Origin) -> Rule | None:
    for rule in rules:
        if matches(rule.match, ds, origin):
            return rule
    return None


def matches(match: Match, ds: Dataset, origin: Origin) -> bool:
    if match.calling_ae_title and not _any_glob([origin.calling_ae_title], match.calling_ae_title):
        return False
    if match.called_ae_title and not _any_glob([origin.called_ae_title], match.called_ae_title):
        return False
    if match.peer_networks and not in_networks(origin.peer_address, match.peer_networks):
        return False
    return all(
        _any_glob(_attribute_texts(ds, keyword), patterns) for keyword, patterns in match.attributes
    )


def _attribute_texts(ds: Dataset, keyword: str) -> list[str]:
    """The values to match: each value of a multi-valued attribute, and all of them joined."""
    value = ds.get(keyword)
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        parts = [str(v).strip() for v in value]
        return [*parts, "\\".join(parts)]
    return [str(value).strip()]


def _any_glob(values: list[str], patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(v, p) for v in values for p in patterns)


def in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    """True if ``address`` is in one of ``networks`` (parsed once, when the config is loaded)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)
