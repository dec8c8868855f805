"""The output lifecycle every clipbeam job shares, and the folder formats it writes.

One piece of code opens an output folder in one of three modes (`Mode.REFUSE`,
`Mode.CLEAR` for `--overwrite`, `Mode.RESUME`), compares the run's settings
with the stored ones on resume (a mismatch is one line, exit 2, naming the
changed keys), refuses a non-empty folder that holds no output of the job's
kind, holds a lease so two runs never write one folder at once, marks units
done, lists the done units, and writes the manifest last (removing it first
when a run starts). `--overwrite` deletes only names the job's run record,
done-markers or previous manifest list, never other files.

Usage (a job whose units are parts)::

    from clipbeam.layout import Mode, OutputKind, open_output

    LABELS = OutputKind("clipbeam.labels", markers="_done", scratch=("_tmp/*.parquet",))

    out = open_output(args.output, LABELS, settings={"labels": labels, "model": model},
                      mode=Mode.from_flags(args.overwrite), storage_options=so)
    with out:                                   # releases the lease if the run fails
        done = out.done_units()                 # {"part-00003": marker, ...}
        out.claim(["labels/part-00004.parquet"])  # names --overwrite may delete later
        ...                                     # write the unit's files, then:
        out.mark_done("part-00004", {"rows": 10}, files=["labels/part-00004.parquet"])
        out.commit({"parts": [...]})            # lease checked, manifest.json written last

Beam workers mark units themselves through `out.ledger` (a picklable
`UnitLedger`), which checks the lease before each marker. Modules:
`folder` (modes, run record, manifest), `ledger` (done-markers), `lease`, `owned`
(deleting owned names, never through a link).
"""

from clipbeam.layout.folder import (
    RUN_RECORD,
    Mode,
    OutputFolder,
    OutputKind,
    changed_keys,
    open_output,
    settings_fingerprint,
)
from clipbeam.layout.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost, read_lease
from clipbeam.layout.ledger import UnitLedger

__all__ = [
    "LEASE_FILE", "RUN_RECORD", "Lease", "LeaseHeld", "LeaseLost", "Mode", "OutputFolder", "OutputKind",
    "UnitLedger", "changed_keys", "open_output", "read_lease", "settings_fingerprint",
]
