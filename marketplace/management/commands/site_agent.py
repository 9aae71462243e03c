"""The site agent: runs at a site behind NAT, pulls its node's jobs from the API and runs them.

    python manage.py site_agent --api https://switchyard.example --token nt_… \
        [--executor dry-run|container] [--host ADDRESS] [--once]

It loops: heartbeat, lease a job, run it through the executor while reporting progress (which
extends the lease), then report complete (with connection details) or fail. It needs nothing
from this project but the standard library, so the file can be copied to a site on its own.
"""

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from django.core.management.base import BaseCommand, CommandError

logger = logging.getLogger("switchyard.site_agent")
AGENT_VERSION = "1.0"


class ExecutorError(Exception):
    def __init__(self, message: str, *, node_failure: bool = False):
        super().__init__(message)
        self.node_failure = node_failure


class DryRunExecutor:
    """Runs nothing; answers as if it had. For trying the whole flow without containers."""

    name = "dry-run"

    def __init__(self, *, host: str):
        self.host = host

    def run(self, kind: str, payload: dict, progress: Callable[[dict], None]) -> dict:
        name = payload.get("container_name", "sy-unknown")
        if kind == "prepare":
            progress({"step": "pull", "image": payload.get("image")})
            return {"detail": f"dry run: would pull {payload.get('image')}"}
        if kind == "start":
            ports = {str(p): int(p) for p in payload.get("ports", [])}
            return {"host": self.host, "ssh_port": 22, "ports": ports, "container_id": name}
        if kind == "stop":
            return {"detail": f"dry run: would remove {name}"}
        raise ExecutorError(f"Unknown job kind {kind!r}.")


class ContainerExecutor:
    """Runs the workload with docker or podman, whichever is on PATH (docker first).

    Environment values are passed through the runtime's own environment (`-e NAME`), never on
    its command line, so they do not show in the process list.
    """

    name = "container"

    def __init__(self, *, host: str, runtime: str | None = None, gpus: bool = False):
        self.runtime = runtime or shutil.which("docker") or shutil.which("podman")
        if not self.runtime:
            raise CommandError(
                "The container executor needs docker or podman on PATH, and neither was found. "
                "Install one, or run with --executor dry-run."
            )
        self.host = host
        self.gpus = gpus

    def _run(self, args: list[str], *, env: dict | None = None, timeout: int = 900) -> str:
        try:
            done = subprocess.run(
                [self.runtime, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **(env or {})},
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ExecutorError(f"{args[0]} timed out after {timeout} s.") from None
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip()[-1000:]
            # The runtime itself is unusable: that is the node's problem, not the workload's.
            daemon_down = "Cannot connect to the Docker daemon" in message
            raise ExecutorError(f"{args[0]} failed: {message}", node_failure=daemon_down)
        return done.stdout

    def run(self, kind: str, payload: dict, progress: Callable[[dict], None]) -> dict:
        name = payload["container_name"]
        if kind == "prepare":
            progress({"step": "pull", "image": payload["image"]})
            self._run(["pull", payload["image"]])
            return {"detail": f"pulled {payload['image']}"}
        if kind == "start":
            return self._start(name, payload, progress)
        if kind == "stop":
            try:
                self._run(["rm", "-f", name], timeout=120)
            except ExecutorError as exc:
                if "No such container" not in str(exc):
                    raise
            return {"detail": f"removed {name}"}
        raise ExecutorError(f"Unknown job kind {kind!r}.")

    def _start(self, name: str, payload: dict, progress: Callable[[dict], None]) -> dict:
        env = dict(payload.get("env", {}))
        env["SSH_PUBLIC_KEYS"] = "\n".join(payload.get("ssh_public_keys", []))
        args = ["run", "-d", "--name", name, "--label", f"switchyard.reservation={name}"]
        if self.gpus and payload.get("gpu_indexes"):
            indexes = ",".join(str(i) for i in payload["gpu_indexes"])
            args += ["--gpus", f'"device={indexes}"']
        for key in sorted(env):
            args += ["-e", key]
        ports = [22, *[p for p in payload.get("ports", []) if p != 22]]
        for port in ports:
            args += ["-p", str(port)]  # a free host port, read back below
        args.append(payload["image"])
        # A leftover container from a crashed earlier attempt would block the name.
        try:
            self._run(["rm", "-f", name], timeout=120)
        except ExecutorError:
            logger.debug("no leftover container %s", name)
        progress({"step": "run", "image": payload["image"]})
        container_id = self._run(args, env=env).strip()[:64]
        mapped = self._mapped_ports(name)
        return {
            "host": self.host,
            "ssh_port": mapped.get("22", 22),
            "ports": {str(p): mapped.get(str(p), p) for p in payload.get("ports", [])},
            "container_id": container_id,
        }

    def _mapped_ports(self, name: str) -> dict[str, int]:
        """`docker port NAME` lines look like `8080/tcp -> 0.0.0.0:49153`."""
        mapped: dict[str, int] = {}
        for line in self._run(["port", name], timeout=60).splitlines():
            inner, _, outer = line.partition("->")
            port = inner.strip().split("/")[0]
            host_port = outer.strip().rsplit(":", 1)[-1]
            if port.isdigit() and host_port.isdigit():
                mapped.setdefault(port, int(host_port))
        return mapped


class AgentClient:
    def __init__(self, *, api: str, token: str, timeout: float = 15):
        self.api = api.rstrip("/")
        self.token = token
        self.timeout = timeout

    def post(self, path: str, body: dict) -> tuple[int, dict | None]:
        request = urllib.request.Request(
            f"{self.api}/api/v1/{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": f"switchyard-site-agent/{AGENT_VERSION}",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, {"error": {"message": raw.decode(errors="replace")[:500]}}


class Agent:
    def __init__(self, *, client: AgentClient, executor, lease_seconds: int, log: Callable):
        self.client = client
        self.executor = executor
        self.lease_seconds = lease_seconds
        self.log = log

    def heartbeat(self) -> bool:
        status, body = self.client.post("agent/heartbeat", {"agent_version": AGENT_VERSION})
        if status == 401:
            raise CommandError("The API refused the node token (revoked or wrong).")
        if status != 200:
            self.log(f"heartbeat answered {status}: {body}")
        return status == 200

    def run_one(self) -> bool:
        """Lease and run one job; False when there was none."""
        status, job = self.client.post("agent/jobs/lease", {"lease_seconds": self.lease_seconds})
        if status == 204:
            return False
        if status != 200:
            self.log(f"lease answered {status}: {job}")
            return False
        job_id, lease_id = job["id"], job["lease_id"]
        self.log(f"job {job_id}: {job['kind']} for {job['reservation']}")
        stop_renewing = threading.Event()
        lost = threading.Event()

        def report_progress(progress: dict) -> None:
            code, _ = self.client.post(
                f"agent/jobs/{job_id}/progress",
                {"lease_id": lease_id, "progress": progress, "lease_seconds": self.lease_seconds},
            )
            if code == 409:
                lost.set()

        def renew() -> None:
            while not stop_renewing.wait(max(1.0, self.lease_seconds / 3)):
                report_progress({"step": "running"})

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            result = self.executor.run(job["kind"], job["payload"], report_progress)
        except ExecutorError as exc:
            stop_renewing.set()
            code, body = self.client.post(
                f"agent/jobs/{job_id}/fail",
                {"lease_id": lease_id, "error": str(exc), "node_failure": exc.node_failure},
            )
            self.log(f"job {job_id} failed: {exc} (reported: {code})")
            return True
        finally:
            stop_renewing.set()
            renewer.join(timeout=5)
        code, body = self.client.post(
            f"agent/jobs/{job_id}/complete", {"lease_id": lease_id, "result": result}
        )
        if code == 200:
            self.log(f"job {job_id} done")
        else:
            # 409: the lease passed to another agent while this one was slow; its result stands.
            self.log(f"job {job_id} completion refused ({code}): {body}")
        return True


class Command(BaseCommand):
    help = "Run a site agent: heartbeat, pull this node's provisioning jobs, run them, report."

    def add_arguments(self, parser):
        parser.add_argument("--api", required=True, help="Base URL of Switchyard, e.g. https://…")
        parser.add_argument("--token", default=os.environ.get("SWITCHYARD_NODE_TOKEN"))
        parser.add_argument("--executor", choices=["dry-run", "container"], default="dry-run")
        parser.add_argument(
            "--host", default=socket.getfqdn(), help="Address customers connect to."
        )
        parser.add_argument("--gpus", action="store_true", help="Pass --gpus to docker run.")
        parser.add_argument("--lease-seconds", type=int, default=60)
        parser.add_argument("--poll-seconds", type=float, default=2.0)
        parser.add_argument("--heartbeat-seconds", type=float, default=30.0)
        parser.add_argument(
            "--once", action="store_true", help="Run the jobs waiting now, then exit."
        )

    def handle(self, *args, **options):
        token = options["token"]
        if not token or not token.startswith("nt_"):
            raise CommandError("--token (or SWITCHYARD_NODE_TOKEN) must be a node token, nt_…")
        if options["executor"] == "container":
            executor = ContainerExecutor(host=options["host"], gpus=options["gpus"])
        else:
            executor = DryRunExecutor(host=options["host"])
        agent = Agent(
            client=AgentClient(api=options["api"], token=token),
            executor=executor,
            lease_seconds=options["lease_seconds"],
            log=lambda message: self.stdout.write(message),
        )
        self.stdout.write(f"site agent {AGENT_VERSION} ({executor.name}) → {options['api']}")
        last_heartbeat = 0.0
        while True:
            now = time.monotonic()
            try:
                if now - last_heartbeat >= options["heartbeat_seconds"]:
                    agent.heartbeat()
                    last_heartbeat = now
                ran = agent.run_one()
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                self.stderr.write(f"API unreachable: {exc}; retrying")
                ran = False
            if options["once"] and not ran:
                return
            if not ran:
                time.sleep(options["poll_seconds"])
