"""The mutation campaign (tests/campaign.py), short: a few hundred cases in CI.

The long one runs outside CI: ``python3 -m tests.campaign --cases 100000 --seed 13``.
"""

from __future__ import annotations

import os

from tests.campaign import run_campaign

CASES = int(os.environ.get("DICOM_NODE_CAMPAIGN_CASES", "400"))


def test_a_short_campaign_keeps_every_promise(nodes, tmp_path) -> None:
    verdict = run_campaign(nodes, tmp_path / "node", CASES, seed=13, settle=90)
    print(f"\n{verdict}")
    assert not verdict.problems, verdict
    # The campaign reached every class of case and both outcomes.
    assert len(verdict.cases) == 7, verdict.cases
    assert verdict.acknowledged > 0 and verdict.statuses.get("0xC000", 0) > 0
    assert verdict.quarantined + verdict.unrouted > 0 or verdict.archived > verdict.good_sent
