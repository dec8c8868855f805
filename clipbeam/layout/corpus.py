"""The folder format of `clipbeam synth-corpus`: webdataset shards and corpus.json (written last).

    OUT/NNNNN.tar     shard N (KEY.png, KEY.txt, KEY.json), written atomically: a shard that exists is complete
    OUT/corpus.json   the corpus' settings, classes and shard names; its presence means "complete"
    OUT/_job.json     the run record (clipbeam.layout): settings and the shard names the job owns

A shard needs no done-marker: it is written under a temporary name and
renamed, so its presence is the marker. `--overwrite` deletes only the shards
the run record names, never other tar files a user keeps in the folder.
"""

from __future__ import annotations

from clipbeam.layout.folder import OutputKind

CORPUS_FILE = "corpus.json"

CORPUS = OutputKind("clipbeam.synth-corpus", manifest=CORPUS_FILE)
