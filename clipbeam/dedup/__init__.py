"""Duplicate groups over stored embeddings, without Beam (the library under `clipbeam dedup`).

`clusters` assigns vectors to the clusters of a coarse quantizer and plans the
blocks each cluster is compared in; `links` finds the pairs at or above the
thresholds inside one block pair, in bounded memory; `components` joins links
into groups (connected components) and merges partial results from any number
of workers; `keep` picks the one sample each group keeps. The Beam job
(transforms/dedup_job.py) only moves these pieces between workers.
"""
