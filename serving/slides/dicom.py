"""DICOM whole-slide images: a folder of instances is one slide per series, never one per file.

A scanner's DICOM export of one slide is several instances: the VOLUME
images (the pyramid, one instance per level or several), and LABEL, OVERVIEW
and THUMBNAIL images. OpenSlide opens the whole series from any of its
VOLUME instances; the others are left out here, so a slide label (which can
carry a patient's name) never reaches an output. Headers are read with
pydicom, pixels never: OpenSlide reads those.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DICOM_SUFFIX = ".dcm"
_UNKNOWN = ("", "unknown", "none", "n/a")
_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "ImageType", "ContainerIdentifier", "SeriesNumber",
         "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "SOPClassUID"]
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


@dataclass(frozen=True)
class DicomSeries:
    """The instances of one slide: its VOLUME files (the pyramid) and the others, which are never read."""

    uid: str
    study: str
    folder: str
    container: str  # ContainerIdentifier: the slide's barcode, "" when the scanner did not know it
    number: str  # SeriesNumber
    volume: tuple[str, ...]
    other: tuple[str, ...]

    @property
    def opened_with(self) -> str:
        """The file OpenSlide opens the series with (its largest VOLUME level, then by name)."""
        return self.volume[0]


def has_dicom(folder: str | Path) -> bool:
    """A folder holding DICOM instances at its top level."""
    p = Path(folder)
    try:
        return p.is_dir() and any(f.suffix.lower() == DICOM_SUFFIX and f.is_file() for f in p.iterdir())
    except OSError:  # a folder that cannot be listed holds nothing we can read
        return False


def series_in(folder: str | Path) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """The slides (series) of a folder of DICOM instances, by series UID; and (file, why) of unusable files."""
    import pydicom

    folder = Path(folder)
    by_uid: dict[str, dict] = defaultdict(lambda: {"volume": [], "other": []})
    bad: list[tuple[str, str]] = []
    for f in sorted(p for p in folder.iterdir() if p.suffix.lower() == DICOM_SUFFIX and p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_TAGS)
            uid = str(ds.SeriesInstanceUID)
            kind = [str(v).upper() for v in ds.get("ImageType", [])]
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged header
            bad.append((str(f), f"not a readable DICOM instance ({type(exc).__name__}: {exc})"))
            continue
        if str(ds.get("SOPClassUID", "")) not in ("", WSI_SOP_CLASS):
            bad.append((str(f), f"a DICOM instance of SOP class {ds.SOPClassUID}, not a whole-slide image"))
            continue
        entry = by_uid[uid]
        entry.setdefault("study", str(ds.get("StudyInstanceUID", "")))
        entry.setdefault("container", str(ds.get("ContainerIdentifier", "") or ""))
        entry.setdefault("number", str(ds.get("SeriesNumber", "") or ""))
        if len(kind) >= 3 and kind[2] == "VOLUME":
            size = int(ds.get("TotalPixelMatrixColumns", 0) or 0) * int(ds.get("TotalPixelMatrixRows", 0) or 0)
            entry["volume"].append((-size, str(f)))
        else:
            entry["other"].append(str(f))
    out = []
    for uid, e in sorted(by_uid.items()):
        container = "" if e["container"].strip().lower() in _UNKNOWN else e["container"].strip()
        out.append(DicomSeries(uid, e["study"], str(folder), container, e["number"],
                               tuple(f for _, f in sorted(e["volume"])), tuple(sorted(e["other"]))))
    return out, bad


def series_label(series: DicomSeries, siblings: list[DicomSeries]) -> str:
    """What a person recognises the slide by: its container identifier (barcode), else its folder's name; with
    several series in one folder, the series number (or, where numbers repeat, the end of the series UID)."""
    if series.container and sum(s.container == series.container for s in siblings) == 1:
        return series.container
    name = Path(series.folder).name
    if len(siblings) == 1:
        return name
    unique_number = series.number and sum(s.number == series.number for s in siblings) == 1
    return f"{name}-series{series.number}" if unique_number else f"{name}-{series.uid.rsplit('.', 1)[-1][-8:]}"


def level_spacings(volume_file: str | Path) -> list[tuple[int, float]]:
    """(total pixel matrix width, microns per pixel) of every VOLUME instance of the series of ``volume_file``."""
    import pydicom

    f = Path(volume_file)
    try:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
    except Exception:  # noqa: BLE001 - unreadable: OpenSlide's opening decides
        return []
    out = []
    for other in sorted(f.parent.glob(f"*{DICOM_SUFFIX}")):
        try:
            ds = pydicom.dcmread(other, stop_before_pixels=True)
            kind = [str(v).upper() for v in ds.get("ImageType", [])]
            if str(ds.SeriesInstanceUID) != uid or len(kind) < 3 or kind[2] != "VOLUME":
                continue
            spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
            out.append((int(ds.TotalPixelMatrixColumns), float(spacing[1]) * 1000.0))  # mm -> um (column)
        except Exception:  # noqa: BLE001 - an instance without the attributes: not counted
            continue
    return out
