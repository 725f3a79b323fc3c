"""Transcoding fallback: decompress keeping the SOP Instance UID, never touch the spool copy."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.errors import PermanentError
from pipeline.transcode import decoded_size, load_uncompressed
from tests.helpers import dcmtk

MiB = 1024 * 1024


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_gdcm.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_decompresses_keeping_the_sop_instance_uid(name: str, target) -> None:
    path = Path(get_testdata_file(name))
    before = _digest(path)
    original = dcmread(path, stop_before_pixels=True)
    ds = load_uncompressed(path, target, 64 * MiB)
    assert ds.SOPInstanceUID == original.SOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == target
    assert ds.original_encoding == (target.is_implicit_VR, True)
    assert len(ds.PixelData) == decoded_size(ds)
    assert _digest(path) == before


def test_dcmtk_jpeg_lossless_ct_decodes(tmp_path: Path) -> None:
    src = Path(get_testdata_file("CT_small.dcm"))
    out = tmp_path / "ct_jpeg.dcm"
    subprocess.run([dcmtk("dcmcjpeg"), str(src), str(out)], check=True, capture_output=True)
    ds = load_uncompressed(out, ImplicitVRLittleEndian, 64 * MiB)
    assert ds.SOPInstanceUID == dcmread(src).SOPInstanceUID
    assert ds.pixel_array.tolist() == dcmread(src).pixel_array.tolist()  # lossless


def test_uncompressed_file_only_changes_encoding() -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    ds = load_uncompressed(path, ImplicitVRLittleEndian, 64 * MiB)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_undecodable_file_is_a_permanent_error_with_the_reason() -> None:
    # 12-bit JPEG Extended: no non-GPL decoder installed (python-gdcm refuses 12 bits)
    with pytest.raises(PermanentError, match="cannot decompress JPEG Extended"):
        load_uncompressed(Path(get_testdata_file("JPGExtended.dcm")), ExplicitVRLittleEndian, 64 * MiB)


def test_file_larger_than_the_bound_is_refused() -> None:
    path = Path(get_testdata_file("JPEG2000.dcm"))
    with pytest.raises(PermanentError, match="max_size"):
        load_uncompressed(path, ExplicitVRLittleEndian, 1000)


def test_decoded_size_larger_than_the_bound_is_refused() -> None:
    path = Path(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    size = path.stat().st_size
    ds = dcmread(path, stop_before_pixels=True)
    assert decoded_size(ds) > size + 1
    with pytest.raises(PermanentError, match="decompressing"):
        load_uncompressed(path, ExplicitVRLittleEndian, size + 1)


def test_unreadable_file_is_a_permanent_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(PermanentError):
        load_uncompressed(bad, ExplicitVRLittleEndian, 64 * MiB)


# -- issue 10 ---------------------------------------------------------------------------

def implicit_copy(name: str, path: Path) -> Path:
    """pydicom's ``name`` (RT Plan, RT Structure Set) as a Part-10 Implicit VR LE file."""
    ds = dcmread(get_testdata_file(name), force=True)
    ds.file_meta = ds.get("file_meta") or ds.file_meta
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return path


@pytest.mark.parametrize("name", ["rtplan.dcm", "rtstruct.dcm"])
def test_defect17_implicit_vr_converts_to_explicit_vr(tmp_path: Path, name: str) -> None:
    """Relabelling an implicitly read data set as explicit wrote elements without a VR
    ("Failed to encode the supplied dataset"); every element must survive, bytes and all."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pynetdicom.dsutils import encode

    path = implicit_copy(name, tmp_path / name)
    ds = load_uncompressed(path, ExplicitVRLittleEndian, 64 * MiB)
    encoded = encode(ds, False, True)
    assert encoded is not None, "pynetdicom could not encode the converted data set"
    received = read_dataset(DicomBytesIO(encoded), False, True)
    source = dcmread(path)
    assert sorted(received.keys()) == sorted(source.keys())
    for elem in source.iterall():
        assert elem.VR != "UN" or elem.tag.is_private, elem.tag
    assert [(e.tag, e.VR, e.value) for e in received.iterall()] == \
        [(e.tag, e.VR, e.value) for e in source.iterall()]


def test_defect17_explicit_vr_still_converts_to_implicit_vr() -> None:
    from pynetdicom.dsutils import decode, encode

    path = Path(get_testdata_file("CT_small.dcm"))
    ds = load_uncompressed(path, ImplicitVRLittleEndian, 64 * MiB)
    received = decode(io.BytesIO(encode(ds, True, True)), True, True)
    source = dcmread(path)
    assert sorted(received.keys()) == sorted(source.keys())
    assert all(received[e.tag].value == e.value for e in source if not e.tag.is_private)


def test_defect04_transcoding_caps_what_a_deflated_file_inflates_to(tmp_path: Path) -> None:
    """The size check used the compressed size: a 0.3 MB deflated file inflating to
    256 MiB passed a 16 MiB max_size and was inflated whole."""
    import resource

    from tests.test_header import deflate_bomb

    path = deflate_bomb(tmp_path / "bomb.dcm", 256 * MiB)
    assert path.stat().st_size < 16 * MiB
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expect = r"inflates to more than 16 MiB \(limit: \[transcode\] max_size\)"
    with pytest.raises(PermanentError, match=expect):
        load_uncompressed(path, ExplicitVRLittleEndian, 16 * MiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_defect04_deflated_file_within_the_bound_is_transcoded() -> None:
    path = Path(get_testdata_file("image_dfl.dcm"))
    ds = load_uncompressed(path, ExplicitVRLittleEndian, 64 * MiB)
    reference = dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.PixelData == reference.PixelData and ds.SOPInstanceUID == reference.SOPInstanceUID
