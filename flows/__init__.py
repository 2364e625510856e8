"""Prefect flows: thin compositions of plain stage functions that record what each stage did."""
