"""Running slides: options, the stages, the in-process runner, the Dask runner, cluster specs,
process tuning."""
