"""The folder format of `clipbeam train`: what a training run owns in its output folder.

    OUT/checkpoints/last.pt   the resume point (rewritten at every --save-every)
    OUT/history.csv, loss.png the curves, rewritten with each checkpoint
    OUT/MODEL.pt + MODEL.json (clip) or vqgan.safetensors + vqgan.yaml (vqgan): the trained model
    OUT/train.json            written last: the run's summary; its presence means "finished"
    OUT/_job.json             the run record (clipbeam.layout): settings, and the names above

A rerun resumes from last.pt only with the same settings; `--overwrite`
deletes only the names the run record lists.
"""

from __future__ import annotations

from clipbeam.layout.folder import OutputKind

SUMMARY = "train.json"

TRAINING = OutputKind("clipbeam.train", manifest=SUMMARY)
