"""Planning: choose every table's settings for a byte budget or an error target.

`space` holds the candidate axes (the `plan:` section of a config; no torch), `measure` runs the
engine itself on each table (whole, or on a stratified row sample for large tables) to get every
candidate's exact bytes and its error, `search` allocates (pure Python), `result` holds the
typed answer, and `run` ties them together as `sparqcli.plan(...)`. docs/PLAN.md has the method.

The package is not named `plan` so that it never shadows the function `sparqcli.plan`.
"""
