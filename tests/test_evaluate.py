"""Scores of classifiers: metrics checked by hand, outputs written, a real folder scored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi_pipeline.learn.evaluate import (
    classification_report,
    comparison_table,
    evaluate_folder,
    tolerate,
    write_confusion_csv,
    write_confusion_png,
)
from wsi_pipeline.model.cards import load_card

CODES = ("MYB", "MMZ", "NGS", "LYT")


def test_scores_match_a_hand_computed_example():
    # truth:     MYB MYB MMZ MMZ NGS LYT
    # predicted: MYB MMZ MMZ NGS NGS LYT
    report = classification_report([0, 0, 1, 1, 2, 3], [0, 1, 1, 2, 2, 3], CODES)
    myb, mmz, ngs = (report["per_class"][c] for c in ("MYB", "MMZ", "NGS"))
    assert (myb["precision"], myb["recall"], myb["f1"]) == (
        1.0,
        0.5,
        pytest.approx(0.6667, abs=1e-4),
    )
    assert (mmz["precision"], mmz["recall"]) == (0.5, 0.5)
    assert (ngs["precision"], ngs["recall"], ngs["support"]) == (0.5, 1.0, 1)
    assert report["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4, abs=1e-4)
    f1s = [2 / 3, 0.5, 2 / 3, 1.0]
    assert report["macro"]["f1"] == pytest.approx(np.mean(f1s), abs=1e-4)
    assert report["weighted"]["f1"] == pytest.approx(np.dot(f1s, [2, 2, 1, 1]) / 6, abs=1e-4)
    assert report["confusion"][1] == [0, 1, 1, 0]


def test_tolerant_variant_accepts_neighbouring_stages_only():
    # MYB->MMZ and MMZ->NGS: only the first pair are neighbours (MMZ-NGB-NGS skips a stage).
    y_true, y_pred = [0, 0, 1, 1, 2, 3], [0, 1, 1, 2, 2, 3]
    assert tolerate(y_true, y_pred, CODES).tolist() == [0, 0, 1, 2, 2, 3]
    tolerant = classification_report(y_true, y_pred, CODES)["tolerant"]
    assert tolerant["per_class"]["MYB"]["recall"] == 1.0
    assert tolerant["per_class"]["MMZ"]["recall"] == 0.5
    assert tolerant["accuracy"] == pytest.approx(5 / 6, abs=1e-4)


def test_classes_absent_from_the_truth_do_not_enter_the_means():
    report = classification_report([0, 0], [0, 0], CODES)
    assert report["macro"]["f1"] == 1.0
    assert report["balanced_accuracy"] == 1.0
    assert report["per_class"]["LYT"]["support"] == 0


def test_confusion_files_and_comparison_table(tmp_path):
    report = classification_report([0, 1, 2, 3], [0, 1, 3, 3], CODES)
    csv_text = write_confusion_csv(report, tmp_path / "c.csv").read_text().splitlines()
    assert csv_text[0] == "true\\predicted,MYB,MMZ,NGS,LYT"
    assert csv_text[3] == "NGS,0,0,0,1"
    png = write_confusion_png(report, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = comparison_table({"a": report, "b": classification_report([0], [0], CODES)})
    assert table.splitlines()[0] == "| | a | b |"
    assert "| NGS F1 | 0.000 | 0.000 |" in table
    assert "| macro F1 | 0.667 | 1.000 |" in table


def test_default_card_on_a_few_real_pbc_cells(shared_data, tmp_path):
    folder = tmp_path / "pbc"
    for class_dir in sorted((shared_data / "pbc").iterdir()):
        (folder / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:4]:
            (folder / class_dir.name / image.name).symlink_to(image)
    # The same card twice, as when a retrained card is scored beside the shipped one.
    card_path = str(load_card("default").path)
    result = evaluate_folder(folder, ["default", card_path], mpp=0.1, out_dir=tmp_path / "out")
    json.dumps(result)  # JSON-able
    assert list(result["reports"]) == ["default", "default-2"]
    report = result["reports"]["default"]
    assert report["n"] == 40
    assert report["n_unrecognised"] == 0
    assert report["accuracy"] > 0.6  # chance is 0.1
    assert result["reports"]["default-2"]["accuracy"] == report["accuracy"]
    assert result["comparison"].splitlines()[0] == "| | default | default-2 |"
    for label in ("default", "default-2"):
        assert (tmp_path / "out" / f"{label}.confusion.png").is_file()
