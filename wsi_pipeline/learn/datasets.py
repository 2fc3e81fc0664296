"""Folders of labelled cell images: scanning, deterministic splits, and crops at a card's scale.

A labelled folder is laid out like the public MLL dataset: one folder per MLL class code
directly under the root, with the images anywhere below it (``ROOT/NGS/batch1/img.jpg``).
Crops exported by the pipeline use the same layout. When a ``patients.csv`` (columns
``image,patient``; ``image`` relative to the root) sits in the root, splits keep each patient's
images together.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from scipy import ndimage
from skimage import measure

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import atomic_path
from wsi_pipeline.core.taxonomy import codes

__all__ = [
    "IMAGE_SUFFIXES",
    "SUBSETS",
    "LabelledCrops",
    "LabelledImage",
    "estimate_mpp_from_red_cells",
    "folder_mpps",
    "load_crops",
    "load_crops_cached",
    "scan_labelled_folder",
    "split_of",
    "write_synthetic_crops",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})
SUBSETS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledImage:
    """One image of a labelled folder.

    Attributes
    ----------
    path : Path
    label : str
        MLL class code (the top-level folder it sits in).
    group : str
        What must not be split across train/val/test: the patient id when known, else the
        image's file name.
    """

    path: Path
    label: str
    group: str


@dataclass
class LabelledCrops:
    """Crops at a card's input size, their class indices (into the card's codes) and the index
    of the folder (source) each came from."""

    crops: NDArray[np.uint8]
    labels: NDArray[np.int64]
    sources: NDArray[np.int16] = field(default_factory=lambda: np.zeros(0, np.int16))


def folder_mpps(
    folders: Sequence[str | os.PathLike[str]], image_mpp: float | Sequence[float] | None
) -> list[float | None]:
    """One pixel size (or None: crops of the card's field of view) per folder, from one value
    for all or one per folder (``wsi train --image-mpp``, a card's ``training.image_mpp``).

    Raises
    ------
    InputError
        When the number of pixel sizes is neither 1 nor the number of folders.
    """
    if image_mpp is None or isinstance(image_mpp, float | int):
        return [None if image_mpp is None else float(image_mpp)] * len(folders)
    if len(image_mpp) == 1:
        return [float(image_mpp[0])] * len(folders)
    if len(image_mpp) != len(folders):
        raise InputError(
            folders[0], f"{len(image_mpp)} pixel sizes given for {len(folders)} image folders"
        )
    return [float(v) for v in image_mpp]


def scan_labelled_folder(
    root: str | os.PathLike[str], classes: Iterable[str] | None = None
) -> list[LabelledImage]:
    """All images below ``ROOT/<CODE>/``, sorted by path.

    Parameters
    ----------
    root : path
        Folder whose subfolders are named by MLL class codes.
    classes : iterable of str, optional
        Keep only these codes (default: every MLL code found).

    Raises
    ------
    InputError
        When the folder is missing or holds no image under any class-code folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "labelled image folder not found")
    wanted = set(codes() if classes is None else classes)
    patients = _read_patients(root)
    items = [
        LabelledImage(path, folder.name, patients.get(path.relative_to(root).as_posix(), path.name))
        for folder in sorted(root.iterdir())
        if folder.is_dir() and folder.name in wanted
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise InputError(root, f"no images in class-code subfolders ({', '.join(sorted(wanted))})")
    return items


def _read_patients(root: Path) -> dict[str, str]:
    table = root / "patients.csv"
    if not table.is_file():
        return {}
    with open(table, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if rows and not {"image", "patient"} <= set(rows[0]):
        raise InputError(table, "needs the columns image,patient")
    return {row["image"]: row["patient"] for row in rows}


def split_of(group: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """The subset ("train", "val" or "test") of a patient or image, fixed by its name alone.

    The SHA-1 of ``group`` is mapped to [0, 1): below ``test_fraction`` is test, below
    ``test_fraction + val_fraction`` validation, the rest training. The split is therefore the
    same on every machine, whatever else is in the folder, and a patient never straddles two
    subsets.
    """
    digest = hashlib.sha1(group.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def _read_rgb(path: Path) -> NDArray[np.uint8]:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(path, f"cannot read image ({error})") from error


def _field_of_view(image: NDArray[np.uint8], crop_px: int | None, size: int) -> NDArray[np.uint8]:
    """The centred square of ``crop_px`` pixels (the whole image's shorter side when None),
    resized to ``size``.

    An image smaller than ``crop_px`` is padded to it with the median colour of its border (its
    background), never stretched: a cell keeps its physical size whatever the image's extent.
    """
    h, w = image.shape[:2]
    side = min(h, w) if crop_px is None else crop_px
    if side > min(h, w):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.median(border, axis=0).round().astype(np.uint8)
        canvas = np.empty((max(side, h), max(side, w), 3), np.uint8)
        canvas[:] = background
        top, left = (canvas.shape[0] - h) // 2, (canvas.shape[1] - w) // 2
        canvas[top : top + h, left : left + w] = image
        image, (h, w) = canvas, canvas.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))


def load_crops(
    paths: Sequence[Path], size: int, fov_um: float, source_mpp: float | None
) -> NDArray[np.uint8]:
    """Decode images and cut the centred field of view a card expects.

    Parameters
    ----------
    paths : sequence of Path
    size : int
        Output side in pixels (the card's input size).
    fov_um : float
        Physical field of view of a crop (the card's ``fov_um``).
    source_mpp : float or None
        Microns per pixel of the images. None means the images already are crops of that
        field of view (as the pipeline exports them) and are only resized. Images smaller
        than the field of view are padded with their background colour, never stretched.

    Returns
    -------
    ndarray of uint8, shape (N, size, size, 3)
    """
    crop_px = None if source_mpp is None else round(fov_um / source_mpp)
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        out[i] = _field_of_view(_read_rgb(path), crop_px, size)
    return out


def load_crops_cached(
    paths: Sequence[Path],
    size: int,
    fov_um: float,
    source_mpp: float | None,
    cache_dir: str | os.PathLike[str] | None,
) -> NDArray[np.uint8]:
    """:func:`load_crops`, memoised in ``cache_dir`` as one ``.npy`` per distinct request.

    The cache key hashes the paths, their sizes and modification times and the crop geometry,
    so a changed folder or card never reuses stale crops.
    """
    if cache_dir is None:
        return load_crops(paths, size, fov_um, source_mpp)
    key = hashlib.sha1(repr((size, fov_um, source_mpp)).encode())
    for path in paths:
        stat = path.stat()
        key.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = Path(cache_dir) / f"crops-{key.hexdigest()[:16]}.npy"
    if cache.is_file():
        return np.load(cache)
    crops = load_crops(paths, size, fov_um, source_mpp)
    with atomic_path(cache) as temp, open(temp, "wb") as stream:
        np.save(stream, crops)
    return crops


def estimate_mpp_from_red_cells(
    paths: Iterable[Path], rbc_diameter_um: float = 7.5, min_cells: int = 20
) -> tuple[float, int]:
    """Microns per pixel of smear photographs, from the size of their isolated red cells.

    Red cells are segmented as the pale-pink foreground (red channel bright, green dimmer than
    background, not the dark-violet white-cell nucleus), holes (the central pallor) filled; the
    round, isolated ones that do not touch the image border are kept (solidity > 0.95,
    eccentricity < 0.6), and their median equivalent diameter is taken to be ``rbc_diameter_um``.

    Returns
    -------
    mpp : float
        Estimated microns per pixel.
    n_cells : int
        How many red cells the estimate rests on.

    Raises
    ------
    ValueError
        When fewer than ``min_cells`` red cells were found.
    """
    diameters: list[float] = []
    for path in paths:
        diameters += _red_cell_diameters(_read_rgb(path))
    if len(diameters) < min_cells:
        raise ValueError(f"only {len(diameters)} isolated red cells found; cannot estimate mpp")
    return rbc_diameter_um / float(np.median(diameters)), len(diameters)


def _red_cell_diameters(rgb: NDArray[np.uint8]) -> list[float]:
    green = rgb[..., 1].astype(np.float32)
    background = np.percentile(green, 95)  # the brightest pixels are plasma/glass
    stained = green < background - 25
    nucleus = green < np.percentile(green, 5) - 10  # darkest violet: white-cell nuclei
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(stained & ~nucleus, iterations=2))
    labels = measure.label(mask)
    h, w = mask.shape
    diameters = []
    for region in measure.regionprops(labels):
        top, left, bottom, right = region.bbox
        touches_border = top == 0 or left == 0 or bottom == h or right == w
        if touches_border or region.area < 200:
            continue
        if region.solidity > 0.95 and region.eccentricity < 0.6:
            diameters.append(float(region.equivalent_diameter_area))
    return diameters


def write_synthetic_crops(
    out: str | os.PathLike[str],
    seeds: Iterable[int],
    slide_size: tuple[int, int] = (8000, 4000),
    card: str | os.PathLike[str] = "synthetic-demo",
    slide_dir: str | os.PathLike[str] | None = None,
) -> int:
    """Write a labelled folder of the crops the pipeline cuts from synthetic slides.

    Each seed gives one slide (:func:`wsi_pipeline.synth.smear.write_synthetic_slide`, 0.25 µm/px).
    Its cells are found and cropped exactly as ``wsi-run`` finds and crops them (every smear
    region but glass), so a classifier trained on them sees the centring and resampling it
    meets at inference; each detection within half a diameter of a ground-truth cell (one to
    one, nearest first) becomes ``OUT/<CLASS>/slide<seed>_<id>.png``. Detections that overlap
    no white cell at all (platelet clumps, debris) become artefacts,
    ``OUT/ART/slide<seed>_d<index>.png``, so a classifier learns to leave them out of the
    count; detections beside a cell they did not match (a split-off lobe) are not used.
    ``OUT/patients.csv`` names each crop's slide, so splits keep slides apart.

    Parameters
    ----------
    out : path
        Output folder (created).
    seeds : iterable of int
        One synthetic slide per seed.
    slide_size : (int, int)
        Level-0 size of each slide.
    card : name or path
        Classifier card whose field of view and input size the crops take.
    slide_dir : path, optional
        Where the slides are written (default: a temporary folder, deleted afterwards).

    Returns
    -------
    int
        Number of crops written.
    """
    from wsi_pipeline.image.slide import open_slide
    from wsi_pipeline.model.cards import load_card
    from wsi_pipeline.run.options import RunOptions
    from wsi_pipeline.run.stages import detect_tiles, plan_slide
    from wsi_pipeline.synth.smear import (
        clear_of_ground_truth,
        match_ground_truth,
        write_synthetic_slide,
    )

    out = Path(out)
    loaded = load_card(card)
    options = RunOptions(classifier=str(loaded.path), region="all")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(slide_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            truth = write_synthetic_slide(folder / f"slide{seed}.svs", size=slide_size, seed=seed)
            with open(truth, newline="") as stream:
                cells = list(csv.DictReader(stream))
            with open_slide(folder / f"slide{seed}.svs") as slide:
                plan = plan_slide(slide, loaded, options)
                found = detect_tiles(slide, plan.tiles, loaded, plan.detect_params)
                mpp = slide.mpp
            truth_xy = np.array([(float(c["x"]), float(c["y"])) for c in cells]).reshape(-1, 2)
            diameter_um = np.array([float(c["diameter_um"]) for c in cells])
            found_xy = np.column_stack([found.columns["x"], found.columns["y"]])
            pairs = match_ground_truth(truth_xy, diameter_um, found_xy, mpp)
            labels = {
                int(j): f"{cells[i]['class']}/slide{seed}_{cells[i]['id']}.png"
                for i, j in zip(*pairs, strict=True)
            }
            for k in np.flatnonzero(clear_of_ground_truth(truth_xy, diameter_um, found_xy, mpp)):
                labels[int(k)] = f"ART/slide{seed}_d{k}.png"
            for j, name in sorted(labels.items()):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(found.crops[j]).save(out / name)
                rows.append((name, f"synthetic-slide-{seed}"))
    with open(out / "patients.csv", "w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows([("image", "patient"), *rows])
    return len(rows)
