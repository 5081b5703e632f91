"""Running the node as hospital IT does: access control, TLS, reload, metrics, JSON logs."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests import images
from tests.conftest import dcmtk, default_config, free_port, guarded, storescu, wait_for_port

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def node_config(root: Path, port: int, node_extra: str = "", rules: str | None = None) -> str:
    """One worker and the default log level (INFO), as an operator would run it."""
    return default_config(root, port, rules, workers=1, node_extra=node_extra, log_level="INFO")


def echo(port: int, calling: str, called: str = "TEST-NODE", tls: ssl.SSLContext | None = None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    kwargs = {"tls_args": (tls, "127.0.0.1")} if tls else {}
    return guarded(ae.associate("127.0.0.1", port, ae_title=called, **kwargs))


def rejection(assoc) -> tuple[int, int, int]:
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def test_allow_list_rejects_unknown_callers_with_the_right_reason(nodes, tmp_path) -> None:
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    node = nodes.start(
        node_config(
            root,
            port,
            """
        allow:
          - {calling_ae_title: "CT_*", peer_address: 127.0.0.0/8}
          - {calling_ae_title: ARCHIVE_QA}
        require_called_ae_title: true
        """,
        ),
        root=root,
        port=port,
    )
    ok = echo(port, "CT_SCANNER7")
    assert ok.is_established
    assert ok.send_c_echo().Status == 0x0000
    ok.release()
    assert echo(port, "ARCHIVE_QA").is_established

    stranger = echo(port, "MR_UNKNOWN")
    assert stranger.is_rejected
    assert rejection(stranger) == (0x01, 0x01, 0x03)  # permanent, calling AE not recognised

    wrong_called = echo(port, "CT_1", called="SOMEONE_ELSE")
    assert wrong_called.is_rejected
    assert rejection(wrong_called) == (0x01, 0x01, 0x07)  # called AE not recognised

    log = node.log_text()
    assert "association rejected: caller 'MR_UNKNOWN' at 127.0.0.1 is not in node.allow" in log
    assert "called 'SOMEONE_ELSE'" in log

    # DCMTK sees the same answer.
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "NOPE", "-aec", "TEST-NODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, all signed by it."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {p.stem + p.suffix: p for p in folder.iterdir()}


def tls_section(port: int, certs: dict[str, Path]) -> str:
    """node.tls on ``port`` with the test CA's server certificate; clients need one too."""
    return f"""
        tls:
          port: {port}
          certificate: {certs["server.crt"]}
          private_key: {certs["server.key"]}
          client_ca: {certs["ca.crt"]}
        """


def test_tls_port_requires_a_client_certificate(nodes, tmp_path) -> None:
    certs = make_certificates(tmp_path / "pki")
    root, port, tls_port = tmp_path / "n", free_port(), free_port()
    root.mkdir()
    node = nodes.start(
        node_config(
            root,
            port,
            tls_section(tls_port, certs),
        ),
        root=root,
        port=port,
    )
    wait_for_port(tls_port)
    assert f"127.0.0.1:{tls_port} (TLS)" in node.log_text()

    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca.crt"])
    client.load_cert_chain(certs["client.crt"], certs["client.key"])
    ds = images.make_ct(rows=32, cols=32, seed=21)
    ae = AE(ae_title="TLS_SCU")
    ae.add_requested_context(ds.SOPClassUID, EXPLICIT_LE)
    assoc = guarded(
        ae.associate("127.0.0.1", tls_port, ae_title="TEST-NODE", tls_args=(client, "127.0.0.1"))
    )
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    [out] = node.wait_archived(1)
    assert pydicom.dcmread(out).SOPInstanceUID == ds.SOPInstanceUID

    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=certs["ca.crt"])
    refused = echo(tls_port, "NO_CERT", tls=anonymous)
    assert not refused.is_established
    assert node.proc.poll() is None  # the node stays up


def test_sighup_applies_a_valid_config_and_keeps_the_old_on_error(nodes, tmp_path) -> None:
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    node = nodes.start(node_config(root, port), root=root, port=port)
    config = node.config
    # An invalid config: logged with its place, the running one stays.
    config.write_text(config.read_text().replace("jpeg-ls-lossless", "jpeg-xx"))
    node.proc.send_signal(signal.SIGHUP)
    node.wait_until(lambda: "reload refused" in node.log_text(), 20, "the refusal")
    assert "rules[0].compress.transfer_syntax: 'jpeg-xx'" in node.log_text()
    ds1 = images.make_ct(rows=32, cols=32, seed=31)
    storescu(port, [_write(ds1, tmp_path, "a.dcm")])
    [first] = node.wait_archived(1)
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    # A valid one applies to the next instance.
    config.write_text(config.read_text().replace("jpeg-xx", "rle-lossless"))
    node.proc.send_signal(signal.SIGHUP)
    node.wait_until(lambda: "reloaded" in node.log_text(), 20, "the reload")
    ds2 = images.make_ct(rows=32, cols=32, seed=32)
    storescu(port, [_write(ds2, tmp_path, "b.dcm")])
    archived = {pydicom.dcmread(p).SOPInstanceUID: p for p in node.wait_archived(2)}
    second = pydicom.dcmread(archived[ds2.SOPInstanceUID])
    assert second.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert node.proc.poll() is None


def test_metrics_healthz_and_json_logs(nodes, tmp_path) -> None:
    root, port, metrics_port = tmp_path / "n", free_port(), free_port()
    root.mkdir()
    node = nodes.start(
        node_config(
            root,
            port,
            f"""
        log_format: json
        metrics: {{host: 127.0.0.1, port: {metrics_port}}}
        """,
        ),
        root=root,
        port=port,
    )
    wait_for_port(metrics_port)
    ds = images.make_ct(rows=64, cols=64, seed=41)
    ds.PatientName = "Doe^Secret"
    ds.PatientID = "PID-SECRET-42"
    storescu(port, [_write(ds, tmp_path, "m.dcm")])
    node.wait_archived(1)
    node.wait_until(
        lambda: "dicom_node_instances_routed_total{" in _get(metrics_port, "/metrics"),
        20,
        "the routed counter",
    )
    text = _get(metrics_port, "/metrics")
    assert 'dicom_node_instances_received_total{result="stored"} 1.0' in text
    assert "dicom_node_cstore_response_seconds_count 1.0" in text
    assert 'transfer_syntax="1.2.840.10008.1.2.4.80"' in text
    assert "dicom_node_backlog 0.0" in text
    assert 'dicom_node_outbox_failed{destination="archive"} 0.0' in text
    assert _get(metrics_port, "/healthz") == "ok\n"

    node.stop()
    lines = [json.loads(line) for line in node.log_text().splitlines() if line.startswith("{")]
    assert any("ready: AE title TEST-NODE" in e["message"] for e in lines)
    assert any(e["message"].startswith("association released: STORESCU") for e in lines)
    # No patient identifiers in the log at the default level.
    assert "PID-SECRET-42" not in node.log_text() and "Secret" not in node.log_text()


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode()


def _write(ds: pydicom.Dataset, folder: Path, name: str) -> Path:
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_forwarding_over_tls_to_a_peer_that_wants_our_certificate(nodes, tmp_path) -> None:
    """One node forwards to another's TLS port, presenting a client certificate."""
    certs = make_certificates(tmp_path / "pki")
    peer_root, peer_port, peer_tls = tmp_path / "peer", free_port(), free_port()
    peer_root.mkdir()
    peer = nodes.start(
        node_config(
            peer_root,
            peer_port,
            tls_section(peer_tls, certs),
        ).replace("ae_title: TEST-NODE", "ae_title: PEER"),
        root=peer_root,
        port=peer_port,
    )
    wait_for_port(peer_tls)
    root, port = tmp_path / "n", free_port()
    root.mkdir()
    config = node_config(
        root,
        port,
        rules="""
  - name: forward
    compress: {transfer_syntax: jpeg-ls-lossless}
    send_to: [peer]
""",
    ).replace(
        "destinations:\n",
        f"""destinations:
  peer:
    type: dicom
    host: 127.0.0.1
    port: {peer_tls}
    ae_title: PEER
    retry: {{initial: 0.2s, max: 1s}}
    tls: {{ca: {certs["ca.crt"]}, certificate: {certs["client.crt"]}, private_key: {certs["client.key"]}}}
""",
    )
    node = nodes.start(config, root=root, port=port)
    ds = images.make_ct(rows=64, cols=64, seed=51)
    storescu(port, [_write(ds, tmp_path, "tls.dcm")])
    [out] = peer.wait_archived(1)
    received = pydicom.dcmread(out)
    assert received.SOPInstanceUID == ds.SOPInstanceUID
    assert "(TLS)" in peer.log_text()
    node.wait_until(
        lambda: not any((node.spool / "destinations" / "peer" / "pending").glob("*.dcm")),
        30,
        "an empty outbox",
    )


def test_a_second_node_on_the_same_spool_refuses_to_start_and_names_the_first(
    nodes, tmp_path
) -> None:
    first = nodes.start()
    # The second node has its own port and config, but the first one's spool.
    root = tmp_path / "second"
    root.mkdir()
    config, port = root / "node.yaml", free_port()
    config.write_text(first.config.read_text().replace(f"port: {first.port}", f"port: {port}"))
    second = subprocess.run(
        [sys.executable, "-m", "node.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert second.returncode == 2, second.stderr
    assert f"is in use by another dicom-node (PID {first.proc.pid}" in second.stderr
    assert str(first.spool) in second.stderr
    # The first node is untouched and still works; once it is gone, the spool is free.
    assert first.proc.poll() is None
    ct = tmp_path / "ct.dcm"
    images.make_ct(64, 64).save_as(ct, enforce_file_format=True)
    storescu(first.port, [ct])
    first.wait_archived(1)
    assert first.stop() == 0
    again = nodes.start(config.read_text(), root=root, port=port)
    assert again.proc.poll() is None
