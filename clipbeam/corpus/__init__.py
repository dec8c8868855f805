"""Reading corpora without Beam: planning parts, tar, manifest-table and folder
readers, text rows, training data, prompt tables and the byte-range fetch of one
sample. Plain library code: usable from a notebook, Spark or Ray; `transforms/`
wraps it in DoFns.
"""
