"""A pynetdicom C-STORE sender that times every C-STORE round trip.

    python3 benchmarks/latency_scu.py --port 11112 --aec DICOM-NODE FILE...

Prints one JSON object: {"latencies_ms": [...], "elapsed_s": ..., "failures": N}.
The time of one C-STORE runs from ``send_c_store`` being called until its response is
decoded: the request is streamed from the file (no pydicom decode) and TCP_NODELAY is on.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from node.pynetdicom_private import keep_responses_from_the_reactor


def presentation_contexts(files: list[Path]) -> set[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs the files need."""
    needed = set()
    for path in files:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        needed.add((str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    return needed


def send(host: str, port: int, aet: str, aec: str, files: list[Path]) -> dict[str, object]:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class, syntax in sorted(presentation_contexts(files)):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=aec)
    if not assoc.is_established:
        raise SystemExit(f"association with {aec}@{host}:{port} failed")
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # pynetdicom's reactor can take a response meant for send_c_store: a 60 s stall
    # in two of five full benchmark runs before this guard (see its docstring).
    keep_responses_from_the_reactor(assoc)
    latencies, failures = [], 0
    started = time.perf_counter()
    try:
        for n, path in enumerate(files):
            if not assoc.is_established:  # aborted: pynetdicom would wait for ever
                failures += len(files) - n
                break
            t0 = time.perf_counter()
            status = assoc.send_c_store(path)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            if getattr(status, "Status", None) != 0x0000:
                failures += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return {
        "latencies_ms": latencies,
        "elapsed_s": time.perf_counter() - started,
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--aet", default="BENCH-SCU")
    parser.add_argument("--aec", required=True)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    # pynetdicom's errors (a DIMSE timeout, an abort) to stderr: the benchmark shows
    # a failed run's last lines.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    result = send(args.host, args.port, args.aet, args.aec, args.files)
    json.dump(result, sys.stdout)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
