"""Beam pipelines and the clipbeam command: one module per job."""
