"""``node.receivers: N``: receiving processes on one port (issue 16, item 1)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import urllib.request

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests import images
from tests.conftest import default_config, free_port, guarded

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def receiver_processes(node_pid: int) -> list[int]:
    out = subprocess.run(
        ["pgrep", "-P", str(node_pid), "-f", "node.receivers"], capture_output=True, text=True
    ).stdout
    return [int(x) for x in out.split()]


def start(nodes, tmp_path, extra: str = "", receivers: int = 2):  # type: ignore[no-untyped-def]
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    rules = "- name: all\n  send_to: [archive]\n"
    config = default_config(root, port, rules, node_extra=f"receivers: {receivers}\n{extra}")
    node = nodes.start(config, root=root, port=port)
    node.wait_until(lambda: len(receiver_processes(node.proc.pid)) == receivers, 30, "receivers")
    return node


class Sender(threading.Thread):
    """A modality: sends its instances, and on a lost association opens a new one and
    sends again what was not acknowledged, as modalities do."""

    def __init__(self, port: int, seeds: range) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.todo = [images.make_ct(rows=64, cols=64, seed=s) for s in seeds]
        self.acknowledged: list[str] = []
        self.retries = 0

    def run(self) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
        deadline = time.monotonic() + 90
        while self.todo and time.monotonic() < deadline:
            assoc = guarded(ae.associate("127.0.0.1", self.port, ae_title="TEST-NODE"))
            if not assoc.is_established:
                self.retries += 1
                time.sleep(0.2)
                continue
            for _ in range(5):  # a few instances per association: many associations
                if not (self.todo and assoc.is_established):
                    break
                ds = self.todo[0]
                status = assoc.send_c_store(ds)
                if "Status" in status and int(status.Status) == 0:
                    self.acknowledged.append(str(ds.SOPInstanceUID))
                    self.todo.pop(0)
                else:
                    self.retries += 1
                    break
            if assoc.is_established:
                assoc.release()


def archived_uids(node) -> set[str]:  # type: ignore[no-untyped-def]
    return {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in node.archived()
    }


def test_two_receivers_share_the_port_and_a_killed_one_loses_nothing(nodes, tmp_path) -> None:
    metrics_port = free_port()
    extra = f"metrics: {{host: 127.0.0.1, port: {metrics_port}}}"
    node = start(nodes, tmp_path, extra)
    first = set(receiver_processes(node.proc.pid))
    senders = [Sender(node.port, range(100 * k, 100 * k + 40)) for k in range(4)]
    for sender in senders:
        sender.start()
    node.wait_until(lambda: len(node.archived()) >= 20, 60, "the run under way")
    victim = sorted(first)[0]
    os.kill(victim, 9)
    for sender in senders:
        sender.join(120)
    acknowledged = {uid for s in senders for uid in s.acknowledged}
    assert len(acknowledged) == 160 and not any(s.todo for s in senders)
    node.wait_until(lambda: archived_uids(node) >= acknowledged, 60, "everything archived")
    node.wait_until(
        lambda: (
            len(receiver_processes(node.proc.pid)) == 2
            and victim not in receiver_processes(node.proc.pid)
        ),
        30,
        "the killed receiver replaced",
    )
    log = node.log_text()
    assert re.search(r"receiving process \d exited", log)
    # Both receivers served associations.
    assert "[receiver 0]: association released" in log
    assert "[receiver 1]: association released" in log
    # The metrics are the node's, summed over the receivers.
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    [stored] = re.findall(r'dicom_node_instances_received_total\{result="stored"\} (\S+)', body)
    assert float(stored) >= 160


def test_max_associations_holds_across_receivers(nodes, tmp_path) -> None:
    node = start(nodes, tmp_path, "max_associations: 2")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    held = []
    for _ in range(6):  # the kernel spreads them: some on each receiver
        if len(held) == 2:
            break
        assoc = guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE"))
        assert assoc.is_established
        held.append(assoc)
    refused = [
        guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE")) for _ in range(4)
    ]
    assert all(a.is_rejected for a in refused), [a.is_established for a in refused]
    for assoc in held:
        assoc.release()
    time.sleep(0.5)
    again = guarded(ae.associate("127.0.0.1", node.port, ae_title="TEST-NODE"))
    assert again.is_established
    again.release()
    assert node.log_text().count("associations in progress (node.max_associations)") == 4
