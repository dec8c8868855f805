"""The Beam SDK container contract, in Python, for the loopback test cluster.

A real runner starts each Python SDK worker through the container's `boot`
program: it asks the provision service for the pipeline options and the list
of staged artifacts, downloads those artifacts from the artifact service,
pip-installs the staged packages (`--extra_package`, `--setup_file`) and only
then starts `sdk_worker_main`. Beam's `worker_pool_main` calls an executable
with that contract when it is given `--container_executable`; this module is
that executable for tests/cluster.py, so that the workers there get the
project's code the way Dataflow, Flink and Spark workers do: from the staged
package, never from the submitting process or its working directory.

Run as: python cluster_boot.py --id=ID --logging_endpoint=... --artifact_endpoint=...
        --provision_endpoint=... --control_endpoint=...
Worker files (staged artifacts, installed packages, the worker's log) go under
$CLIPBEAM_CLUSTER_WORKDIR (default: the system temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import grpc
from apache_beam.portability import common_urns
from apache_beam.portability.api import (
    beam_artifact_api_pb2,
    beam_artifact_api_pb2_grpc,
    beam_provision_api_pb2,
    beam_provision_api_pb2_grpc,
    beam_runner_api_pb2,
    endpoints_pb2,
)
from google.protobuf import json_format, text_format

EXTRA_PACKAGES_FILE = "extra_packages.txt"
WORKFLOW_TARBALL_FILE = "workflow.tar.gz"


def provision(endpoint: str, worker_id: str) -> beam_provision_api_pb2.ProvisionInfo:
    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        request = beam_provision_api_pb2.GetProvisionInfoRequest()
        return stub.GetProvisionInfo(request, metadata=[("worker_id", worker_id)]).info


def fetch_artifacts(endpoint: str, worker_id: str, dependencies, dest: str) -> list[str]:
    """Download every staged artifact under its staged name; returns the names."""
    names = []
    with grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = beam_artifact_api_pb2_grpc.ArtifactRetrievalServiceStub(channel)
        for artifact in dependencies:
            if artifact.role_urn != common_urns.artifact_roles.STAGING_TO.urn:
                raise RuntimeError(f"artifact role {artifact.role_urn} is not supported by this boot")
            name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload).staged_name
            request = beam_artifact_api_pb2.GetArtifactRequest(artifact=artifact)
            with open(os.path.join(dest, name), "wb") as sink:
                for chunk in stub.GetArtifact(request, metadata=[("worker_id", worker_id)]):
                    sink.write(chunk.data)
            names.append(name)
    return names


def packages_to_install(staged: str, names: list[str]) -> list[str]:
    """Staged packages in the order boot installs them: extra packages, then the setup tarball."""
    if "requirements.txt" in names:
        raise RuntimeError("--requirements_file is not supported by the test cluster's boot; "
                           "stage the project as a package instead")
    packages = []
    if EXTRA_PACKAGES_FILE in names:
        with open(os.path.join(staged, EXTRA_PACKAGES_FILE)) as handle:
            packages += [os.path.join(staged, line.strip()) for line in handle if line.strip()]
    if WORKFLOW_TARBALL_FILE in names:
        packages.append(os.path.join(staged, WORKFLOW_TARBALL_FILE))
    return packages


def install(packages: list[str], target: str, log) -> None:
    """pip-install the staged packages into `target`, offline and without
    dependencies: the worker environment already holds the pinned ones, as the
    SDK container image does."""
    if not packages:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
               "--no-build-isolation", "--disable-pip-version-check", "--target", target, *packages]
    log.write(f"boot: {' '.join(command)}\n")
    log.flush()
    subprocess.run(command, check=True, stdout=log, stderr=log)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for flag in ("id", "logging_endpoint", "artifact_endpoint", "provision_endpoint", "control_endpoint"):
        parser.add_argument(f"--{flag}", required=True)
    args = parser.parse_args(argv)

    root = os.environ.get("CLIPBEAM_CLUSTER_WORKDIR") or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix=f"worker-{args.id}-", dir=root)
    staged = os.path.join(work, "staged")
    site = os.path.join(work, "site")
    os.makedirs(staged)
    log = open(os.path.join(work, "worker.log"), "a", buffering=1)  # noqa: SIM115 (handed to the worker)

    info = provision(args.provision_endpoint, args.id)
    names = fetch_artifacts(args.artifact_endpoint, args.id, info.dependencies, staged)
    log.write(f"boot: worker {args.id} staged {sorted(names)}\n")
    install(packages_to_install(staged, names), site, log)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["WORKER_ID"] = args.id
    env["SEMI_PERSISTENT_DIRECTORY"] = work
    env["PIPELINE_OPTIONS"] = json.dumps(json_format.MessageToDict(info.pipeline_options))
    env["RUNNER_CAPABILITIES"] = " ".join(info.runner_capabilities)
    env["CONTROL_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(
        endpoints_pb2.ApiServiceDescriptor(url=args.control_endpoint))
    env["LOGGING_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(
        endpoints_pb2.ApiServiceDescriptor(url=args.logging_endpoint))
    # The worker replaces this process, so that killing the pool's process group kills it too.
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.execve(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"], env)


if __name__ == "__main__":
    main(sys.argv[1:])
