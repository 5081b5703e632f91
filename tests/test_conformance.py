"""The conformance statement says what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from node.scp import ACCEPTED_TRANSFER_SYNTAXES

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
UID = re.compile(r"\|\s*(1\.2\.840\.10008\.[0-9.]+)\s*\|")


def section(start_marker: str) -> str:
    text = DOC.read_text()
    start = text.index(start_marker)
    return text[start : text.index("<!-- end -->", start)]


def test_accepted_transfer_syntaxes_match_the_scp() -> None:
    documented = UID.findall(section("<!-- accepted-transfer-syntaxes"))
    assert documented == list(ACCEPTED_TRANSFER_SYNTAXES)


def test_statuses_documented_are_the_handlers() -> None:
    from node import statuses

    text = DOC.read_text()
    for code in (statuses.SUCCESS, statuses.OUT_OF_RESOURCES, statuses.CANNOT_UNDERSTAND):
        assert f"| 0x{code:04X} |" in text
