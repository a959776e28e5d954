"""pipelines/reports/: recorded runs read back as tables.

Owns: `labbook compare` as a DataFrame (compare.py, also for notebooks), `labbook diff`
(diff.py: parameters, metrics, provenance, executed notebooks cell by cell). May import:
`pipelines/tracking/`, MLflow, pandas, nbdime. Executes nothing.
"""
