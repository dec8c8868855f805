"""A Beam cluster on loopback: Beam's job service and two external worker pools.

Workers on Dataflow, Flink or Spark are separate processes that get pickled
code and staged packages over the Beam job API. This harness builds the same
thing on 127.0.0.1 from Beam's own servers:

- `local_job_service_main` (the portable job API; it runs the job's stages and
  asks a worker pool for SDK workers),
- two `worker_pool_main` processes, each started with
  `--container_executable` = tests/cluster_boot.py, which does what the SDK
  container's boot does (download the staged artifacts, pip-install the staged
  packages, start the SDK worker).

Honesty of the staging: the servers and workers run in a *worker environment*
that holds every pinned dependency of the project's .venv but not clipbeam
itself (a bare venv whose site-packages points at .venv's site-packages by a
plain path line, so .venv's editable-install hook is not run), with a working
directory outside the repository. A worker can therefore import clipbeam only
from the wheel that the job staged (`--extra_package`, built from pyproject
into a temp folder by `build_wheel`). tests/test_cluster.py checks both sides:
the worker environment cannot import clipbeam, and a job submitted without the
staged wheel fails.

Submit with `cluster.beam_args(pool)`: `--runner PortableRunner --job_endpoint
localhost:P --environment_type EXTERNAL --environment_config localhost:POOL
--extra_package clipbeam-*.whl`.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv"
BOOT = Path(__file__).resolve().parent / "cluster_boot.py"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    """Until something accepts connections on 127.0.0.1:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:3]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def kill_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group (the server and the workers it spawned), then SIGKILL."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers outlive a terminated pool otherwise
    except ProcessLookupError:
        pass
    process.wait()


def build_wheel(dest: Path, repo: Path = REPO) -> Path:
    """The project's wheel, built from pyproject.toml in a copy of the sources
    (so that building writes nothing into the repository)."""
    src = dest / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copy2(repo / "pyproject.toml", src)
    for name in ("README.md", "LICENSE"):
        if (repo / name).exists():
            shutil.copy2(repo / name, src)
    shutil.copytree(repo / "clipbeam", src / "clipbeam", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = dest / "dist"
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--disable-pip-version-check", "-w", str(wheels), str(src)],
                   check=True, capture_output=True)
    (wheel,) = glob.glob(str(wheels / "clipbeam-*.whl"))
    return Path(wheel)


def make_worker_env(dest: Path) -> Path:
    """A venv with the project's pinned dependencies and without clipbeam.

    Its site-packages holds one .pth line naming .venv's site-packages: a plain
    path line, so .venv's own .pth files (the editable clipbeam hook) are not
    run and `import clipbeam` fails there unless a job stages it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    purelib = sysconfig.get_path("purelib", vars={"base": str(dest), "platbase": str(dest)})
    venv_site = sysconfig.get_path("purelib", vars={"base": str(VENV), "platbase": str(VENV)})
    Path(purelib, "clipbeam-cluster-deps.pth").write_text(venv_site + "\n")
    return dest


@dataclass
class Server:
    name: str
    port: int
    command: list[str]
    log: Path
    process: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LoopbackCluster:
    """Job service + worker pools as separate process groups under `root`."""

    root: Path
    pools: int = 2
    env_dir: Path | None = None
    job_service: Server | None = None
    workers: list[Server] = field(default_factory=list)
    wheel: Path | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.cwd = self.root / "cwd"  # the servers' and workers' working directory, outside the repo
        self.cwd.mkdir(exist_ok=True)
        self.workdir = self.root / "workers"
        self.workdir.mkdir(exist_ok=True)

    # -- environment -----------------------------------------------------
    @property
    def python(self) -> str:
        return str(self.env_dir / "bin" / "python")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([str(self.env_dir / "bin"), env.get("PATH", "")])
        env["VIRTUAL_ENV"] = str(self.env_dir)
        env["CLIPBEAM_CLUSTER_WORKDIR"] = str(self.workdir)
        env["HF_HUB_OFFLINE"] = "1"
        env["TOKENIZERS_PARALLELISM"] = "false"
        return env

    def boot_executable(self) -> Path:
        """worker_pool_main takes one executable path: a wrapper that runs the
        Python boot with the worker environment's interpreter (first on PATH)."""
        wrapper = self.root / "boot.sh"
        wrapper.write_text(f'#!/bin/sh\nexec python "{BOOT}" "$@"\n')
        wrapper.chmod(0o755)
        return wrapper

    # -- processes -------------------------------------------------------
    def _spawn(self, server: Server) -> None:
        handle = open(server.log, "ab")  # noqa: SIM115 (owned by the child)
        server.process = subprocess.Popen(server.command, cwd=self.cwd, env=self.env(), stdout=handle,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()

    def start(self) -> "LoopbackCluster":
        if self.env_dir is None:
            self.env_dir = make_worker_env(self.root / "workerenv")
        self.wheel = build_wheel(self.root / "wheel")
        port = free_port()
        self.job_service = Server(
            "job-service", port,
            [self.python, "-m", "apache_beam.runners.portability.local_job_service_main", "--port", str(port),
             "--staging_dir", str(self.root / "staging")],
            self.root / "job-service.log")
        boot = self.boot_executable()
        for i in range(self.pools):
            pool_port = free_port()
            self.workers.append(Server(
                f"pool-{i}", pool_port,
                [self.python, "-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool_port),
                 "--container_executable", str(boot)],
                self.root / f"pool-{i}.log"))
        for server in [self.job_service, *self.workers]:
            self._spawn(server)
        for server in [self.job_service, *self.workers]:
            wait_listening(server.port, server.process, server.log)
        return self

    def kill_pool(self, index: int) -> None:
        """SIGKILL a worker pool and its workers at once, as a lost machine."""
        server = self.workers[index]
        try:
            os.killpg(server.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.process.wait()

    def restart_pool(self, index: int) -> None:
        server = self.workers[index]
        if server.alive:
            kill_group(server.process)
        self._spawn(server)
        wait_listening(server.port, server.process, server.log)

    def stop(self) -> None:
        for server in [*self.workers, self.job_service]:
            if server is not None and server.process is not None:
                kill_group(server.process)

    def __enter__(self) -> "LoopbackCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- submitting ------------------------------------------------------
    @property
    def job_endpoint(self) -> str:
        return f"localhost:{self.job_service.port}"

    def pool_endpoint(self, index: int) -> str:
        return f"localhost:{self.workers[index].port}"

    def beam_args(self, pool: int = 0, stage: bool = True) -> list[str]:
        """The pass-through flags that submit a job to this cluster, on one pool."""
        args = ["--runner", "PortableRunner", "--job_endpoint", self.job_endpoint,
                "--environment_type", "EXTERNAL", "--environment_config", self.pool_endpoint(pool)]
        if stage:
            args += ["--extra_package", str(self.wheel)]
        return args

    def worker_dirs(self) -> list[Path]:
        return sorted(p for p in self.workdir.iterdir() if p.is_dir())

    def logs(self, tail: int = 4000) -> str:
        """The servers' and workers' logs, for a failing test's message."""
        parts = []
        for path in [self.job_service.log, *(w.log for w in self.workers),
                     *(d / "worker.log" for d in self.worker_dirs())]:
            if path.exists():
                parts.append(f"--- {path.name if path.parent == self.root else path.parent.name}\n"
                             f"{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)
