"""Shared foundations: errors, the cell taxonomy, the cell-table schema, files, threads."""
