"""pipelines/specs/: YAML in, validated spec objects out; the one place settings are checked.

Owns: the training spec (spec.py), its `tune:` block (tune_spec.py), pipeline specs
(pipeline_spec.py), and reading YAML and wording its errors in one line (spec_io.py, which
imports no torch; spec_yaml.py, the strict YAML loader), and every LABBOOK_* environment
variable, read and checked up front (environment.py, standard library only). Checked against
`lightning_modules/catalog.json` (the registry as data). May import: `pipelines/errors.py`,
`lightning_modules.catalog` and `lightning_modules.settings` (the declarations every number is
checked with: no boolean passes as a number). Imported by everything above.
"""
