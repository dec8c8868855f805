#!/usr/bin/env bash
# Fetches into .whl/ the wheels that benchmarks/gpu_check.sh installs on a GPU machine that cannot reach
# PyPI. That machine's image has Python 3.12 with torch, torchvision, timm, pyarrow, numpy, grpcio,
# protobuf, pillow, fsspec, pandas and friends, but neither apache-beam nor open_clip nor webdataset.
# The versions are this checkout's .venv pins, so the GPU runs the code the tests ran. Run here, from
# the repository root, with the internet; .whl/ is git-ignored and travels with `carry: [".whl"]`.
set -euo pipefail
PY="${PY:-.venv/bin/python}"
PACKAGES="apache-beam beartype fastavro fasteners httplib2 jsonpickle objsize proto-plus zstandard pymongo
dnspython cryptography cffi pycparser pytz open_clip_torch ftfy wcwidth webdataset braceexpand"
mkdir -p .whl
for name in $PACKAGES; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_34_x86_64 --platform manylinux1_x86_64 -d .whl "$name==$version"
done
du -sh .whl
