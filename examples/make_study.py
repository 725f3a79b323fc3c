"""Write a small synthetic study (fresh UIDs) for the examples: ``make_study.py DIR [N] [--sr]``.

The images carry a made-up patient; with ``--sr`` a Basic Text SR is added, so the
routing rules of example 02 have something to keep away from the remote site.
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


def image(study_uid: str, series_uid: str, number: int, size: int) -> Dataset:
    ds = base(study_uid, CT_IMAGE, "CT")
    ds.SeriesInstanceUID = series_uid
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("count", type=int, nargs="?", default=5)
    parser.add_argument("--size", type=int, default=128, help="rows = columns")
    parser.add_argument("--sr", action="store_true", help="add a structured report")
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for number in range(1, args.count + 1):
        image(study, series, number, args.size).save_as(
            args.directory / f"ct{number:04d}.dcm", enforce_file_format=True)
    if args.sr:
        report(study).save_as(args.directory / "report.dcm", enforce_file_format=True)
    print(study)


if __name__ == "__main__":
    main()
