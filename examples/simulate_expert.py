"""Stand in for the expert of ``examples/lab_loop.md`` on the synthetic example slide.

Reads the GeoJSON ``wsi-run`` wrote and the slide's ground truth (``<slide>.cells.csv``), and
writes what QuPath would export after an expert reviewed the ``--review`` cells of highest
``Review priority``: each one given its true class (a cell that matches no true cell classed
``Artefact (ART)``), plus a point for every true cell within the counted region that no
detection found. Only the reviewed cells and the added points are exported, as with a
selection in ``export_corrections.groovy``: pass ``--scope reviewed`` to ``wsi corrections``.

Usage: ``python examples/simulate_expert.py RUN.geojson SLIDE.cells.csv OUT.geojson [--review N]``
"""

from __future__ import annotations

import argparse
import csv
import json
import uuid
from pathlib import Path

import numpy as np
import shapely

from wsi_pipeline.core.taxonomy import cell_class


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("geojson", type=Path)
    parser.add_argument("truth", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--review", type=int, default=100)
    args = parser.parse_args()

    features = json.loads(args.geojson.read_text(encoding="utf-8"))["features"]
    region = next(f for f in features if f["properties"]["objectType"] == "annotation")
    cells = [f for f in features if f["properties"]["objectType"] == "cell"]
    with open(args.truth, newline="") as stream:
        truth = list(csv.DictReader(stream))
    true_xy = np.array([(float(t["x"]), float(t["y"])) for t in truth])
    counted = shapely.geometry.shape(region["geometry"])

    def true_class(feature: dict) -> tuple[str, int]:
        """The class of the true cell whose centre lies in the cell's outline (ART if none)."""
        outline = shapely.geometry.shape(feature["geometry"])
        inside = [k for k, (x, y) in enumerate(true_xy) if outline.contains(shapely.Point(x, y))]
        return (truth[inside[0]]["class"], inside[0]) if inside else ("ART", -1)

    found = {true_class(f)[1] for f in cells} - {-1}
    ranked = sorted(cells, key=lambda f: -f["properties"]["measurements"]["Review priority"])
    reviewed = ranked[: args.review]
    exported = []
    for feature in reviewed:
        code, _ = true_class(feature)
        feature["properties"]["classification"] = {"name": cell_class(code).label}
        exported.append(feature)
    for k, (x, y) in enumerate(true_xy):
        if k not in found and counted.contains(shapely.Point(x, y)):
            exported.append(
                {
                    "type": "Feature",
                    "id": str(uuid.uuid4()),
                    "geometry": {"type": "Point", "coordinates": [x, y]},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": cell_class(truth[k]["class"]).label},
                    },
                }
            )
    document = {"type": "FeatureCollection", "features": exported}
    args.out.write_text(json.dumps(document, indent=2), encoding="utf-8")
    added = len(exported) - len(reviewed)
    print(f"{args.out}: {len(reviewed)} reviewed cells, {added} points added")


if __name__ == "__main__":
    main()
