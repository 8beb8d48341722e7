"""DICOM whole-slide images for tests (VL Whole Slide Microscopy, TILED_FULL, JPEG frames), written with pydicom
as the Imaging Data Commons serves them: one file per pyramid level, every file of a slide in one series.
OpenSlide (libdicom) reads them as one slide from any of its files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _level(path: Path, rgb: np.ndarray, tile: int, mm_per_px: float, uids: dict, instance: int, container: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    h, w = rgb.shape[:2]
    frames = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            frame = np.full((tile, tile, 3), 255, np.uint8)
            part = rgb[y:y + tile, x:x + tile]
            frame[:part.shape[0], :part.shape[1]] = part
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
            frames.append(buffer.getvalue())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = WSI_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
    ds.Modality, ds.PatientID, ds.PatientName, ds.ContainerIdentifier = "SM", "P1", "P1", container
    ds.ImageType = ["ORIGINAL" if instance == 1 else "DERIVED", "PRIMARY", "VOLUME",
                    "NONE" if instance == 1 else "RESAMPLED"]
    ds.InstanceNumber, ds.DimensionOrganizationType = instance, "TILED_FULL"
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
    ds.Columns = ds.Rows = tile
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * mm_per_px, h * mm_per_px, 0.001
    spacing = Dataset()
    spacing.PixelSpacing, spacing.SliceThickness = [mm_per_px, mm_per_px], 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([spacing])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence, ds.NumberOfOpticalPaths = Sequence([optical]), 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def write_dicom_slide(folder: str | Path, rgb: np.ndarray, mpp: float = 0.25, downsamples=(1, 4), tile: int = 256,
                      container: str = "SLIDE-1", prefix: str = "") -> list[Path]:
    """One DICOM slide of `rgb`: a file per pyramid level in `folder` (`<prefix>level<k>.dcm`), one series."""
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    paths = []
    for i, ds in enumerate(downsamples):
        level = rgb if ds == 1 else np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // ds, rgb.shape[0] // ds)))
        paths.append(folder / f"{prefix}level{i}.dcm")
        _level(paths[-1], level, tile, mpp * ds / 1000, uids, i + 1, container)
    return paths
