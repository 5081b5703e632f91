"""Storage Commitment (PS3.4 Annex J) on dicom destinations: Orthanc as the real peer,
which confirms on a new association to the node's own port, and an in-process
pynetdicom peer that reports an instance as not committed."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import MRImageStorage, StorageCommitmentPushModel

from node.destinations.commitment import PUSH_MODEL_INSTANCE, Commitments, Reference
from tests import images
from tests.conftest import free_port, guarded, storescu
from tests.orthanc import Orthanc, start_orthanc
from tests.test_forward import dicom_destination, outbox_files, write_all

AS_RECEIVED = """
  - name: as-received
    send_to: [pacs]
"""
COMMIT = "storage_commitment: true"


def commit_files(spool: Path, name: str = "pacs") -> list[Path]:
    folder = spool / "destinations" / name / "commit"
    return sorted(folder.glob("*.json")) if folder.exists() else []


@pytest.fixture
def orthanc_knowing_node(tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    """Orthanc that knows the node (port chosen here) as a modality, as commitment needs."""
    node_port = free_port()
    modalities = {"node": ["TEST-NODE", "127.0.0.1", node_port]}
    server = start_orthanc(tmp_path / "orthanc", extra={"DicomModalities": modalities})
    yield server, node_port
    server.stop()


def test_orthanc_commits_on_its_own_association_then_the_outbox_empties(
    nodes, orthanc_knowing_node: tuple[Orthanc, int], tmp_path: Path
) -> None:
    orthanc, node_port = orthanc_knowing_node
    node = nodes.start(
        rules=AS_RECEIVED,
        port=node_port,
        extra_destinations=dicom_destination("pacs", orthanc.dicom_port, orthanc.aet, COMMIT),
    )
    sources = [images.make_mr(rows=32, cols=32, seed=i) for i in range(3)]
    uids = {str(s.SOPInstanceUID) for s in sources}
    storescu(node.port, write_all(sources, tmp_path / "send"))
    node.wait_spool_empty()  # routed: each instance is in the outbox or beyond
    node.wait_until(lambda: not outbox_files(node.spool, "pacs"), 30, "empty outbox")
    assert uids <= set(orthanc.sop_instance_uids())
    assert not commit_files(node.spool) and not outbox_files(node.spool, "pacs", "failed")
    log = node.log_text()
    counts = re.findall(r"(\d+) of (\d+) instance\(s\) committed", log)
    assert counts and all(a == b for a, b in counts)
    assert sum(int(a) for a, _ in counts) == len(sources)
    assert "ORTHANC at 127.0.0.1" in log


def test_orthanc_that_does_not_know_the_node_never_commits_so_nothing_is_lost(
    nodes, tmp_path: Path
) -> None:
    """Orthanc 1.10 aborts the N-ACTION of a modality it does not know ("Rejected
    N-ACTION request" in its log): the instance stays in the outbox and is sent again."""
    orthanc = start_orthanc(tmp_path / "orthanc")  # no DicomModalities
    try:
        node = nodes.start(
            rules=AS_RECEIVED,
            extra_destinations=dicom_destination(
                "pacs", orthanc.dicom_port, orthanc.aet, COMMIT + "\n  commitment_timeout: 1s"
            ),
        )
        source = images.make_mr(rows=16, cols=16, seed=7)
        storescu(node.port, write_all([source], tmp_path / "send"))
        orthanc.wait_instances(1)
        node.wait_until(
            lambda: node.log_text().count("sending them again") >= 2, 30, "two failed requests"
        )
        assert len(outbox_files(node.spool, "pacs")) == 1  # still in the outbox
        assert not outbox_files(node.spool, "pacs", "failed")
    finally:
        orthanc.stop()


# ----------------------------------------------------------------------------- failing peer


class CommitPeer:
    """A pynetdicom Storage + Storage Commitment SCP that reports on a new association
    to the node, failing the first instance of its first transaction."""

    def __init__(self, node_port: int) -> None:
        self.node_port = node_port
        self.port = free_port()
        self.stored: list[str] = []
        self.transactions: list[list[str]] = []
        self.answers: list[int] = []
        self.ae = AE(ae_title="PEER")
        self.ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.ae.add_supported_context(StorageCommitmentPushModel)
        self.ae.add_requested_context(StorageCommitmentPushModel)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self.on_store),
                (evt.EVT_N_ACTION, self.on_action),
            ],
        )

    def on_store(self, event: evt.Event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def on_action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        refs = [
            (r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID)
            for r in info.ReferencedSOPSequence
        ]
        first = not self.transactions
        self.transactions.append([str(uid) for _, uid in refs])
        args = (str(info.TransactionUID), refs, first)
        threading.Thread(target=self.report, args=args, daemon=True).start()
        return 0x0000, None

    def report(self, transaction: str, refs: list[tuple[str, str]], fail_first: bool) -> None:
        time.sleep(0.3)  # after the N-ACTION response, as a real PACS would
        ds = Dataset()
        ds.TransactionUID = transaction
        ok, bad = (refs[1:], refs[:1]) if fail_first else (refs, [])
        ds.ReferencedSOPSequence = [_ref(c, i) for c, i in ok]
        if bad:
            ds.FailedSOPSequence = [_ref(c, i, 0x0112) for c, i in bad]
        assoc = guarded(
            self.ae.associate(
                "127.0.0.1",
                self.node_port,
                ae_title="TEST-NODE",
                ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
            )
        )
        assert assoc.is_established
        status, _ = assoc.send_n_event_report(
            ds, 2 if bad else 1, StorageCommitmentPushModel, PUSH_MODEL_INSTANCE
        )
        self.answers.append(int(status.Status))
        assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


def _ref(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def test_instance_reported_not_committed_is_sent_again(nodes, tmp_path: Path) -> None:
    node_port = free_port()
    peer = CommitPeer(node_port)
    try:
        node = nodes.start(
            rules=AS_RECEIVED,
            port=node_port,
            extra_destinations=dicom_destination("pacs", peer.port, "PEER", COMMIT),
        )
        sources = [images.make_mr(rows=16, cols=16, seed=i) for i in range(3)]
        storescu(node.port, write_all(sources, tmp_path / "send"))
        node.wait_until(lambda: len(peer.answers) >= 2, 30, "two commitment reports")
        node.wait_until(lambda: not outbox_files(node.spool, "pacs"), 30, "empty outbox")
    finally:
        peer.stop()
    failed = peer.transactions[0][0]
    assert peer.stored.count(failed) == 2  # sent again after the failure report
    assert peer.transactions[-1] == [failed]
    assert peer.answers == [0x0000] * len(peer.answers)
    assert not commit_files(node.spool) and not outbox_files(node.spool, "pacs", "failed")
    assert "no such object instance" in node.log_text()


# ----------------------------------------------------------------------------- durability


def test_open_transaction_survives_a_restart_and_expires(tmp_path: Path) -> None:
    now = [1000.0]
    settled: list[tuple[str, str]] = []

    def tracker() -> Commitments:
        return Commitments(
            tmp_path / "commit",
            "pacs",
            timeout=60.0,
            committed=lambda i: settled.append((i, "committed")),
            not_committed=lambda i, why: settled.append((i, why)),
            clock=lambda: now[0],
        )

    first = tracker()
    assert first.load() == []
    txn = first.open({"a": Reference("1.2", "1.2.3.1"), "b": Reference("1.2", "1.2.3.2")})

    again = tracker()  # a restart: the transaction is read back from disk
    assert sorted(again.load()) == ["a", "b"] and again.knows(txn.uid)
    now[0] += 59
    again.expire()
    assert settled == []
    now[0] += 2
    again.expire()
    assert [i for i, _ in settled] == ["a", "b"]
    assert "no storage commitment report within 61 s" in settled[0][1]
    assert not list((tmp_path / "commit").glob("*.json"))
