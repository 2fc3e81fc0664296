"""What a run publishes: the differential, the Zarr store, QuPath GeoJSON, the report, the
cohort table."""
