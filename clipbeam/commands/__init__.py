"""The clipbeam commands: one module per command (parse, validate, build, commit)."""
