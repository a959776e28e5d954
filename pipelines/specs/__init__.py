"""pipelines/specs/: YAML in, validated spec objects out; the one place settings are checked.

Owns: the training spec (spec.py), its `tune:` block (tune_spec.py), pipeline specs
(pipeline_spec.py), and reading YAML and wording its errors in one line (spec_io.py, which
imports no torch). Checked against `lightning_modules/catalog.json` (the registry as data).
May import: `pipelines/errors.py`, `lightning_modules.catalog`. Imported by everything above.
"""
