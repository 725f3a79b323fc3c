"""Write a small synthetic study (fresh UIDs) for the examples: ``make_study.py DIR [N] [--sr]``.

The images carry a made-up patient; with ``--sr`` a Basic Text SR is added, so the
routing rules of example 02 have something to keep away from the remote site.
With ``--series "DESCRIPTION=N"`` (repeatable, instead of N) the study gets one series
per option, numbered in order, with that Series Description and N images — so the
study-level rules of example 04 have series to tell apart. It prints the Study UID.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def base(study_uid: str, sop_class: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "DEMO^PATIENT"
    ds.PatientID = "DEMO0001"
    ds.StudyDate = "20261128"
    ds.Modality = modality
    return ds


def image(study_uid: str, series_uid: str, number: int, size: int,
          series: tuple[int, str] | None = None) -> Dataset:
    """One CT image; ``series`` (number, description) labels its series, when given."""
    ds = base(study_uid, CT_IMAGE, "CT")
    ds.SeriesInstanceUID = series_uid
    if series is not None:
        ds.SeriesNumber, ds.SeriesDescription = series
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(size * size * 2)
    return ds


def report(study_uid: str) -> Dataset:
    ds = base(study_uid, BASIC_TEXT_SR, "SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    return ds


def series_option(text: str) -> tuple[str, int]:
    """``"AXIAL CHEST=5"`` -> ("AXIAL CHEST", 5): descriptions may hold spaces."""
    description, sep, count = text.rpartition("=")
    if not sep or not description or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected DESCRIPTION=N, got {text!r}")
    return description, int(count)


def write_series(directory: Path, study: str, series: list[tuple[str, int]], size: int) -> None:
    """One series per entry, numbered 1, 2, …; files s<series>-<instance>.dcm."""
    for series_number, (description, count) in enumerate(series, start=1):
        series_uid = generate_uid()
        for number in range(1, count + 1):
            image(study, series_uid, number, size, (series_number, description)).save_as(
                directory / f"s{series_number:02d}-{number:04d}.dcm", enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("count", type=int, nargs="?", default=5)
    parser.add_argument("--size", type=int, default=128, help="rows = columns")
    parser.add_argument("--sr", action="store_true", help="add a structured report")
    parser.add_argument("--series", type=series_option, action="append", metavar="DESCRIPTION=N",
                        help="a series of N images with this description (repeatable; replaces N)")
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    if args.series:
        write_series(args.directory, study, args.series, args.size)
    else:
        for number in range(1, args.count + 1):
            image(study, series, number, args.size).save_as(
                args.directory / f"ct{number:04d}.dcm", enforce_file_format=True)
    if args.sr:
        report(study).save_as(args.directory / "report.dcm", enforce_file_format=True)
    print(study)


if __name__ == "__main__":
    main()
