"""The MLL taxonomy: codes, groups, colours and tolerated confusions."""

from __future__ import annotations

import re

import pytest

from wsi_pipeline.core.taxonomy import (
    CLASSES,
    GROUPS,
    TOLERATED_CONFUSIONS,
    cell_class,
    codes,
    group_of,
)

MLL_CODES = (
    *("ABE", "ART", "BAS", "BLA", "EBO", "EOS", "FGC", "HAC", "KSC", "LYI", "LYT"),
    *("MMZ", "MON", "MYB", "NGB", "NGS", "NIF", "OTH", "PEB", "PLM", "PMO"),
)


def test_the_21_mll_codes_in_order():
    assert codes() == tuple(MLL_CODES)


def test_every_class_has_a_known_group_a_name_and_a_distinct_colour():
    assert {c.group for c in CLASSES} == set(GROUPS)
    assert all(c.name and c.name[0].isupper() for c in CLASSES)
    colours = [c.colour for c in CLASSES]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", colour) for colour in colours)
    assert len(set(colours)) == len(colours)


def test_clinical_groups_of_key_classes():
    assert group_of("BLA") == "blasts"
    assert group_of("NGB") == group_of("NGS") == "neutrophils"
    assert group_of("PEB") == group_of("EBO") == "erythroid"
    assert group_of("PLM") == "plasma cells"


def test_artefacts_smudges_and_others_are_not_counted():
    uncounted = {c.code for c in CLASSES if not c.counted}
    assert uncounted == {"ART", "KSC", "NIF", "OTH"}


def test_tolerated_confusions_are_neighbouring_stages_only():
    chain = ["PMO", "MYB", "MMZ", "NGB", "NGS"]
    expected = {frozenset(p) for p in zip(chain[:-1], chain[1:], strict=True)} | {
        frozenset({"PEB", "EBO"})
    }
    assert expected == TOLERATED_CONFUSIONS
    assert frozenset({"PMO", "NGS"}) not in TOLERATED_CONFUSIONS


def test_unknown_code_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown cell class 'XYZ'.*ABE"):
        cell_class("XYZ")


def test_maturation_order_holds_every_class_once():
    from wsi_pipeline.core.taxonomy import MATURATION_ORDER

    assert sorted(MATURATION_ORDER) == sorted(codes())
    granulopoiesis = [MATURATION_ORDER.index(c) for c in ("BLA", "PMO", "MYB", "MMZ", "NGB", "NGS")]
    assert granulopoiesis == sorted(granulopoiesis)
