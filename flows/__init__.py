"""Prefect flows: thin compositions of plain stage functions that record what each stage did.

The offline settings are applied here, when the package is first imported, so that they precede
every Prefect import in its modules whatever order those modules' imports are sorted in (Prefect
reads them once, at its own import: one set later is ignored).
"""

from skymoe.flows import prefect_env  # noqa: F401  (applies the offline settings)
