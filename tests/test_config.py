"""Config validation: every mistake names its place; the shipped configs load."""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import ipaddress
import json
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import UID

from node.codecs.base import CompressSpec
from node.codecs.spec import check_spec
from node.codecs.syntaxes import known_names, lookup_syntax
from node.config import (
    RESTART_ONLY,
    FolderDestination,
    NodeSettings,
    load_config,
    parse_config,
    yaml_keys,
)
from node.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
node: {ae_title: COMPRESS_SCP, port: 11112, spool: spool}
destinations:
  archive: {type: folder, path: archive}
rules:
  - name: ct
    match: {Modality: [CT, MR], calling_ae_title: "CT*", peer_address: 10.1.0.0/16}
    compress: {transfer_syntax: jpeg-ls-lossless}
    send_to: [archive]
  - name: rest
    send_to: archive
"""


def parse(text: str):
    return parse_config(textwrap.dedent(text), base_dir=Path("/srv/node"))


def test_example_config_from_the_issue_loads() -> None:
    config = load_config(ROOT / "config" / "example.yaml")
    assert [r.name for r in config.rules] == ["ct-mr-lossless", "us-lossy", "everything-else"]
    assert str(config.rules[0].compress.transfer_syntax) == "1.2.840.10008.1.2.4.80"
    assert config.rules[1].compress.compression_ratio == 10
    assert config.rules[2].compress.plugin == "pylibjpeg"
    assert config.rules[0].match.attributes == (("Modality", ("CT", "MR")),)
    assert config.node.worker_count >= 1


def test_embedded_default_resolves_relative_paths_against_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    assert config.node.ae_title == "DICOM-NODE"
    assert config.node.port == 11112
    assert config.node.spool == tmp_path / "dicom-node-data" / "spool"
    archive = config.destinations["archive"]
    assert isinstance(archive, FolderDestination)
    assert archive.path == tmp_path / "dicom-node-data" / "archive"
    assert str(config.rules[0].compress.transfer_syntax) == "1.2.840.10008.1.2.4.80"


def test_relative_paths_resolve_against_the_config_folder() -> None:
    config = parse(GOOD)
    assert config.node.spool == Path("/srv/node/spool")
    assert config.destinations["archive"].path == Path("/srv/node/archive")
    assert config.rules[1].compress is None
    assert config.rules[0].match.peer_networks == (ipaddress.ip_network("10.1.0.0/16"),)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("jpeg-ls-lossless", "jpeg-xx"),
            "rules[0].compress.transfer_syntax: 'jpeg-xx' is not a known transfer syntax; known: ",
        ),
        (
            ("send_to: archive", "send_to: pacs"),
            "rules[1].send_to[0]: 'pacs' is not a defined destination",
        ),
        (("Modality:", "Modalty:"), "rules[0].match.Modalty: not a DICOM keyword"),
        (("port: 11112", "port: 70000"), "node.port: must be at most 65535"),
        (
            ("ae_title: COMPRESS_SCP", "ae_title: THIS_TITLE_IS_TOO_LONG"),
            "node.ae_title: an AE title has 1 to 16",
        ),
        (("type: folder", "type: s3"), "destinations.archive.type: 's3' is not a destination type"),
        (("10.1.0.0/16", "10.1.0.0/99"), "rules[0].match.peer_address: '10.1.0.0/99' is not an IP"),
        (
            ("compress: {transfer_syntax: jpeg-ls-lossless}", "compres: {transfer_syntax: x}"),
            "rules[0].compres: unknown key",
        ),
        (
            (
                "{transfer_syntax: jpeg-ls-lossless}",
                "{transfer_syntax: jpeg-ls-lossless, max_error: 2}",
            ),
            "rules[0].compress.max_error: not a parameter of jpeg-ls-lossless",
        ),
        (
            ("{transfer_syntax: jpeg-ls-lossless}", "{transfer_syntax: jpeg-2000}"),
            "rules[0].compress: jpeg-2000 needs exactly one of compression_ratio, psnr",
        ),
        (
            (
                "{transfer_syntax: jpeg-ls-lossless}",
                "{transfer_syntax: rle-lossless, plugin: nosuch}",
            ),
            "rules[0].compress.plugin:",
        ),
        (
            ("path: archive}", "path: archive, layout: '../{SOPInstanceUID}'}"),
            "destinations.archive.layout: must be a relative path",
        ),
        (
            ("path: archive}", "path: archive, layout: '{PatientID}.dcm'}"),
            "destinations.archive.layout: must contain {SOPInstanceUID}",
        ),
        (("port: 11112", "port: 11113"), None),
        (
            (
                "archive: {type: folder, path: archive}",
                "archive: {type: folder, path: archive}\n  pacs: {type: dicom, host: h, port: 104, "
                "ae_title: P, storage_commitment: true, commitment_timeout: soon}",
            ),
            "destinations.pacs.commitment_timeout: 'soon' is not a duration",
        ),
    ],
)
def test_bad_config_names_the_place(change: tuple[str, str], message: str | None) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD or message is None, "the test's replacement did not apply"
    if message is None:
        parse(text)
        return
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value).startswith(message), str(info.value)


def test_yaml_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError, match=r"line 3, column"):
        parse_config("node:\n  port: 1\n  - x\n", base_dir=Path("."), source="bad.yaml")


def test_check_config_cli(tmp_path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    ok = subprocess.run(
        [sys.executable, "-m", "node.cli", "check-config", str(good)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "[0] ct: Modality in ['CT', 'MR']" in ok.stdout
    assert "compress to jpeg-ls-lossless (1.2.840.10008.1.2.4.80)" in ok.stdout
    assert "[1] rest: everything -> send as received -> archive" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("jpeg-ls-lossless", "jpeg-xx"))
    failed = subprocess.run(
        [sys.executable, "-m", "node.cli", "check-config", str(bad)], capture_output=True, text=True
    )
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1, failed.stderr
    assert (
        "rules[0].compress.transfer_syntax: 'jpeg-xx' is not a known transfer syntax"
        in failed.stderr
    )


def test_run_refuses_bad_config_before_binding(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("port: 11112", "port: zero"))
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "node.port: expected a whole number, got 'zero'" in result.stderr


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("dicom-node ")


# --------------------------------------------------------------- config and codecs agree

PARAMETER_VALUES = {
    "max_error": [-1, 0, 2, 255, 256],
    "compression_ratio": [0.5, 1, 1.5, 10],
    "psnr": [0.5, 1, 40],
    "quality": [0, 1, 90, 100, 101],
    "plugin": ["pylibjpeg", "imagecodecs", "gdcm", "pydicom", "nope"],
}


def check_config(text: str) -> tuple[int, str]:
    """``dicom-node check-config`` on ``text``, in this process: (exit code, stderr)."""
    from node.cli import main

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "node.yaml"
        path.write_text(text)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["check-config", str(path)])
    return code, err.getvalue()


def compress_config(compress: dict[str, object]) -> str:
    return textwrap.dedent(f"""
        destinations:
          archive: {{type: folder, path: archive}}
        rules:
          - name: one
            compress: {json.dumps(compress)}
            send_to: [archive]
        """)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(known_names()),
    parameters=st.dictionaries(
        st.sampled_from(sorted(PARAMETER_VALUES)),
        st.integers(0, 4),
        max_size=3,
    ),
)
def test_check_config_rejects_every_spec_the_codecs_reject(
    name: str, parameters: dict[str, int]
) -> None:
    values = {
        key: PARAMETER_VALUES[key][i % len(PARAMETER_VALUES[key])] for key, i in parameters.items()
    }
    spec = CompressSpec(transfer_syntax=UID(lookup_syntax(name).uid), **values)
    code, stderr = check_config(compress_config({"transfer_syntax": name, **values}))
    problem = check_spec(spec)
    if problem is not None:
        assert code == 1, f"check-config accepted {values} for {name}; the codecs say: {problem}"
        assert stderr.startswith("dicom-node: rules[0].compress"), stderr
    if code == 0:
        assert problem is None


def test_compression_ratio_of_one_is_refused_with_its_place(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(compress_config({"transfer_syntax": "jpeg-2000", "compression_ratio": 1}))
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", "check-config", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert (
        result.stderr
        == "dicom-node: rules[0].compress.compression_ratio: must be greater than 1, not 1\n"
    )


def test_the_shipped_default_is_the_embedded_one() -> None:
    shipped = ROOT / "config" / "default.yaml"
    embedded = importlib.resources.files("node").joinpath("default.yaml").read_bytes()
    assert shipped.read_bytes() == embedded


def test_every_node_setting_is_a_key_and_a_reload_keeps_the_restart_only_ones() -> None:
    text = GOOD.replace("port: 11112", "port: 11112, max_associations: 3, workers: 4")
    config = parse(text)
    assert config.node.max_associations == 3 and config.node.workers == 4
    assert set(yaml_keys(NodeSettings)) == {f.name for f in fields(NodeSettings)}
    assert set(RESTART_ONLY) == {
        "ae_title",
        "host",
        "port",
        "spool",
        "workers",
        "receivers",
        "max_pdu",
        "tls",
        "metrics",
        "log_format",
    }
