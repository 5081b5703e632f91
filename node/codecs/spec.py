"""Whether a rule's ``compress:`` block can be carried out: one check for config and codecs.

:func:`parameter_problem` looks at the spec alone (syntax, parameters and their
ranges) and imports no codec library, so the config loader runs it in the receiving
process. :func:`check_spec` adds whether an encoder for it is installed, which
imports the encoder packages; the transcoder runs it before every encode and
``dicom-node check-config`` for every rule, so a config that passes ``check-config``
is one the workers carry out.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import JPEGLSNearLossless

from node.codecs.base import CompressSpec, SyntaxInfo
from node.codecs.syntaxes import BY_UID

# JPEG-LS NEAR is at most 255 (ISO 14495-1 C.2.4.1.1: min(255, MAXVAL / 2)).
MAX_NEAR = 255
# Below 1 dB nothing of the image is left; the config has always refused it.
MIN_PSNR = 1.0


@dataclass(frozen=True)
class SpecProblem:
    """Why a spec cannot be carried out, and the ``compress:`` key at fault (if one is)."""

    key: str | None
    detail: str

    @property
    def message(self) -> str:
        return f"{self.key} {self.detail}" if self.key else self.detail


def parameter_problem(spec: CompressSpec) -> SpecProblem | None:
    """What is wrong with ``spec``'s syntax or parameters, without asking the encoders."""
    info = BY_UID.get(str(spec.transfer_syntax))
    if info is None:
        return SpecProblem(
            None, f"transfer syntax {spec.transfer_syntax} is not one the node can write"
        )
    if spec.quality is not None:
        if "quality" not in info.parameters:
            return SpecProblem("quality", f"applies only to jpeg-baseline, not {info.name}")
        if not isinstance(spec.quality, int) or not 1 <= spec.quality <= 100:
            return SpecProblem("quality", f"must be an integer from 1 to 100, not {spec.quality!r}")
    if spec.max_error is not None:
        if info.uid != JPEGLSNearLossless:
            return SpecProblem(
                "max_error", f"applies only to jpeg-ls-near-lossless, not {info.name}"
            )
        if not isinstance(spec.max_error, int) or not 0 <= spec.max_error <= MAX_NEAR:
            return SpecProblem(
                "max_error", f"must be an integer from 0 to {MAX_NEAR}, not {spec.max_error!r}"
            )
    return _j2k_quality_problem(spec, info)


def _j2k_quality_problem(spec: CompressSpec, info: SyntaxInfo) -> SpecProblem | None:
    given = [p for p in ("compression_ratio", "psnr") if getattr(spec, p) is not None]
    if "compression_ratio" not in info.parameters:
        if given:
            return SpecProblem(given[0], f"applies only to jpeg-2000 and htj2k, not {info.name}")
        return None
    if len(given) != 1:
        return SpecProblem(None, f"{info.name} needs exactly one of compression_ratio or psnr")
    if spec.compression_ratio is not None and not spec.compression_ratio > 1:
        return SpecProblem(
            "compression_ratio", f"must be greater than 1, not {spec.compression_ratio:g}"
        )
    if spec.psnr is not None and not spec.psnr >= MIN_PSNR:
        return SpecProblem("psnr", f"must be at least {MIN_PSNR:g} (dB), not {spec.psnr:g}")
    return None


def encoder_problem(spec: CompressSpec) -> SpecProblem | None:
    """Whether an encoder for ``spec`` (its ``plugin``, if named) is installed here.

    Imports the encoder packages to find out.
    """
    from node.codecs.plugins import check_plugin

    problem = check_plugin(spec.transfer_syntax, spec.plugin)
    return None if problem is None else SpecProblem("plugin" if spec.plugin else None, problem)


def spec_problem(spec: CompressSpec) -> SpecProblem | None:
    """Everything :func:`check_spec` checks, with the key at fault."""
    if str(spec.transfer_syntax) not in BY_UID:
        return parameter_problem(spec)
    return encoder_problem(spec) or parameter_problem(spec)


def check_spec(spec: CompressSpec) -> str | None:
    """An error message if ``spec`` cannot be carried out on this machine, else None."""
    problem = spec_problem(spec)
    return None if problem is None else problem.message
