"""Transcoding between implicit and explicit VR, end to end: the real ``dicomflow send``
delivers to a real DCMTK ``storescp`` that accepts only one uncompressed transfer
syntax, and what arrives is compared element by element with the source."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.helpers import Daemon, dicom_files, wait_for
from tests.peers import StoreSCP
from tests.sendkit import endpoint_conf, put_in_outbox
from tests.test_transcode import implicit_copy

CLASSES = ("RTPlanStorage", "RTStructureSetStorage", "CTImageStorage")

# storescp's association negotiation profiles: one uncompressed transfer syntax only
STORESCP_PROFILES = """\
[[TransferSyntaxes]]
[ExplicitLittle]
TransferSyntax1 = LittleEndianExplicit
[ImplicitLittle]
TransferSyntax1 = LittleEndianImplicit

[[PresentationContexts]]
[ExplicitOnlyContexts]
{explicit}
[ImplicitOnlyContexts]
{implicit}

[[Profiles]]
[ExplicitOnly]
PresentationContexts = ExplicitOnlyContexts
[ImplicitOnly]
PresentationContexts = ImplicitOnlyContexts
"""


def _profiles(path: Path) -> Path:
    def contexts(syntaxes: str) -> str:
        lines = [f"PresentationContext1 = VerificationSOPClass\\{syntaxes}"]
        lines += [f"PresentationContext{n} = {sop}\\{syntaxes}" for n, sop in enumerate(CLASSES, 2)]
        return "\n".join(lines)

    path.write_text(STORESCP_PROFILES.format(explicit=contexts("ExplicitLittle"),
                                             implicit=contexts("ImplicitLittle")))
    return path


def _elements(path: Path) -> list[tuple]:
    """Every element, nested ones included, as (tag, VR, value); private VRs aside
    (an implicit file cannot say them: they arrive as UN, the value bytes unchanged)."""
    ds = dcmread(path)
    return [(e.tag, "private" if e.tag.is_private else e.VR, e.value) for e in ds.iterall()]


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_defect17_implicit_rt_objects_reach_an_explicit_only_destination(tmp_path: Path, cleanup,
                                                                        fastpath: str) -> None:
    """RT Plan / RT Structure Set as Implicit VR LE went to failed/ ("Failed to encode
    the supplied dataset") where DCMTK's storescu converts and delivers them."""
    sources = [implicit_copy(name, tmp_path / name) for name in ("rtplan.dcm", "rtstruct.dcm")]
    received = _deliver(tmp_path, cleanup, sources, "ExplicitOnly", fastpath)
    for source in sources:
        arrived = received[str(dcmread(source).SOPInstanceUID)]
        assert dcmread(arrived).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert _elements(arrived) == _elements(source), source.name


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_defect17_explicit_sequences_reach_an_implicit_only_destination(tmp_path: Path, cleanup,
                                                                       fastpath: str) -> None:
    """The sibling: towards Implicit VR a raw sequence kept its items' explicit encoding
    (CT_small's Other Patient IDs Sequence arrived with one item of two)."""
    source = Path(get_testdata_file("CT_small.dcm"))
    received = _deliver(tmp_path, cleanup, [source], "ImplicitOnly", fastpath)
    arrived = received[str(dcmread(source).SOPInstanceUID)]
    assert dcmread(arrived).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert len(dcmread(arrived).OtherPatientIDsSequence) == 2
    assert _elements(arrived) == _elements(source)


def _deliver(tmp_path: Path, cleanup: list, sources: list[Path], profile: str,
             fastpath: str) -> dict[str, Path]:
    """Send ``sources`` through a real sender to storescp with ``profile``; return the
    received files by SOP Instance UID."""
    config = _profiles(tmp_path / "storescp.cfg")
    peer = StoreSCP(tmp_path / "recv", ae_title="PACS", extra=("-xf", str(config), profile)).start()
    cleanup.append(peer)
    conf = endpoint_conf(tmp_path, {"pacs": {"port": peer.port, "ae_title": "PACS"}})
    put_in_outbox(tmp_path / "spool", "pacs", sources)
    sender = Daemon(conf, "send", "pacs", env={"DICOMFLOW_FASTPATH": fastpath}).start()
    cleanup.append(sender)
    spool = tmp_path / "spool"

    def settled() -> bool:
        return len(dicom_files(spool / "sent/pacs")) + len(dicom_files(spool / "failed/pacs")) \
            == len(sources)

    wait_for(settled, message="every file sent or failed")
    errors = [p.read_text() for p in (spool / "failed/pacs").glob("*.error")]
    assert errors == [] and len(dicom_files(spool / "sent/pacs")) == len(sources)
    assert "transcoding" in sender.log()
    assert sender.stop() == 0
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in peer.files()}
