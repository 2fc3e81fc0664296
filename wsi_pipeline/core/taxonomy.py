"""The 21 white-cell classes of the MLL bone-marrow dataset (Matek et al. 2021) and their groups.

Each class has its MLL code, full name, the clinical group a marrow differential reports it in,
whether it enters the differential's denominator, and a display colour (distinct per class,
hues grouped by lineage so a mosaic or a QuPath overlay reads at a glance).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CLASSES",
    "GROUPS",
    "MATURATION_ORDER",
    "TOLERATED_CONFUSIONS",
    "CellClass",
    "cell_class",
    "class_of_label",
    "codes",
    "group_of",
]

#: Clinical groups in the order a differential lists them.
GROUPS: tuple[str, ...] = (
    "blasts",
    "promyelocytes",
    "myelocytes",
    "metamyelocytes",
    "neutrophils",
    "eosinophils",
    "basophils",
    "monocytes",
    "lymphocytes",
    "plasma cells",
    "erythroid",
    "other",
    "not counted",
)

# Groups left out of the differential's denominator (ICSH: artefacts, smudge cells, other cells).
_UNCOUNTED_GROUPS = frozenset({"other", "not counted"})


@dataclass(frozen=True)
class CellClass:
    """One white-cell class.

    Attributes
    ----------
    code : str
        Three-letter MLL code, e.g. ``"NGS"``.
    name : str
        Full English name.
    group : str
        Clinical group, one of :data:`GROUPS`.
    colour : str
        Display colour as ``"#rrggbb"``.
    """

    code: str
    name: str
    group: str
    colour: str

    @property
    def counted(self) -> bool:
        """Whether the class enters the denominator of a marrow differential."""
        return self.group not in _UNCOUNTED_GROUPS

    @property
    def label(self) -> str:
        """The name shown to a reader and in QuPath, with the code: ``"Blast (BLA)"``."""
        return f"{self.name} ({self.code})"


CLASSES: tuple[CellClass, ...] = (
    CellClass("ABE", "Abnormal eosinophil", "eosinophils", "#c0392b"),
    CellClass("ART", "Artefact", "not counted", "#7f8c8d"),
    CellClass("BAS", "Basophil", "basophils", "#4b0082"),
    CellClass("BLA", "Blast", "blasts", "#ff0000"),
    CellClass("EBO", "Erythroblast", "erythroid", "#8b4513"),
    CellClass("EOS", "Eosinophil", "eosinophils", "#ff8c00"),
    CellClass("FGC", "Faggot cell", "promyelocytes", "#ff1493"),
    CellClass("HAC", "Hairy cell", "lymphocytes", "#00ced1"),
    CellClass("KSC", "Smudge cell", "not counted", "#b0b0b0"),
    CellClass("LYI", "Immature lymphocyte", "lymphocytes", "#1e90ff"),
    CellClass("LYT", "Lymphocyte", "lymphocytes", "#0000cd"),
    CellClass("MMZ", "Metamyelocyte", "metamyelocytes", "#9acd32"),
    CellClass("MON", "Monocyte", "monocytes", "#008080"),
    CellClass("MYB", "Myelocyte", "myelocytes", "#ffd700"),
    CellClass("NGB", "Band neutrophil", "neutrophils", "#32cd32"),
    CellClass("NGS", "Segmented neutrophil", "neutrophils", "#006400"),
    CellClass("NIF", "Not identifiable", "not counted", "#d3d3d3"),
    CellClass("OTH", "Other cell", "other", "#696969"),
    CellClass("PEB", "Proerythroblast", "erythroid", "#d2691e"),
    CellClass("PLM", "Plasma cell", "plasma cells", "#9400d3"),
    CellClass("PMO", "Promyelocyte", "promyelocytes", "#ff69b4"),
)

#: The classes in the order a haematologist reads a differential: granulopoiesis from blast to
#: segmented neutrophil, eosinophils and basophils, then erythroid, lymphoid and monocytic
#: cells, then the rest.
MATURATION_ORDER: tuple[str, ...] = (
    "BLA", "PMO", "FGC", "MYB", "MMZ", "NGB", "NGS", "ABE", "EOS", "BAS",
    "PEB", "EBO", "LYI", "LYT", "HAC", "PLM", "MON", "OTH", "ART", "KSC", "NIF",
)  # fmt: skip

_BY_CODE = {c.code: c for c in CLASSES}
_BY_LABEL = {c.label: c for c in CLASSES}

#: Unordered pairs of neighbouring maturation stages whose confusion the "tolerant" metrics
#: accept (granulopoiesis PMO-MYB-MMZ-NGB-NGS and erythropoiesis PEB-EBO; Matek et al. 2021).
TOLERATED_CONFUSIONS: frozenset[frozenset[str]] = frozenset(
    frozenset(pair)
    for pair in (("PMO", "MYB"), ("MYB", "MMZ"), ("MMZ", "NGB"), ("NGB", "NGS"), ("PEB", "EBO"))
)


def codes() -> tuple[str, ...]:
    """The 21 MLL codes in alphabetical order."""
    return tuple(_BY_CODE)


def cell_class(code: str) -> CellClass:
    """The :class:`CellClass` of an MLL code.

    Raises
    ------
    KeyError
        With the list of known codes when ``code`` is not one of them.
    """
    try:
        return _BY_CODE[code]
    except KeyError:
        raise KeyError(
            f"unknown cell class {code!r}; expected one of {', '.join(_BY_CODE)}"
        ) from None


def class_of_label(label: str) -> CellClass:
    """The :class:`CellClass` of a label (``"Blast (BLA)"``, see :attr:`CellClass.label`) or of
    a bare code (``"BLA"``).

    Raises
    ------
    KeyError
        With the list of known labels when ``label`` is neither.
    """
    text = label.strip()
    found = _BY_LABEL.get(text) or _BY_CODE.get(text)
    if found is None:
        known = ", ".join(f'"{c.label}"' for c in CLASSES)
        raise KeyError(f"unknown cell class {label!r}; expected one of {known}")
    return found


def group_of(code: str) -> str:
    """Clinical group of an MLL code."""
    return cell_class(code).group
