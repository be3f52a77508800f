"""Start and stop a real ComfyUI server for integration tests.

    with ComfyServer(host_dir, tmp_path / "base", custom_nodes={"comfy_pipefusion": repo}) as srv:
        info = srv.object_info()
        pid = srv.queue_prompt(prompt, client_id)
        entry = srv.wait_for_prompt(pid, timeout=60)

`host_dir` is a ComfyUI checkout made by tests/host/install_comfyui.sh (see default_host_dir()).
No import-time side effects; websocket-client is imported only by ws_connect().
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

COMFY_VERSION = "0.3.75"
BASE_LAYOUT = (
    "models/diffusion_models", "models/unet", "models/text_encoders", "models/clip", "models/vae",
    "input", "output", "temp", "user", "custom_nodes",
)


def configured_version() -> str:
    """The ComfyUI release install_comfyui.sh installs: $PIPEFUSION_COMFY_VERSION, else COMFY_VERSION."""
    return os.environ.get("PIPEFUSION_COMFY_VERSION") or COMFY_VERSION


def default_host_dir(version: str | None = None) -> Path:
    """Where install_comfyui.sh puts ComfyUI `version` (default: configured_version()) unless told
    otherwise. $PIPEFUSION_COMFY_HOST names the folder of the configured version only."""
    version = version or configured_version()
    env = os.environ.get("PIPEFUSION_COMFY_HOST")
    if env and version == configured_version():
        return Path(env)
    return Path.home() / ".cache" / "comfy-pipefusion" / f"comfyui-{version}"


def host_installed(host_dir: os.PathLike | str | None = None, version: str | None = None) -> bool:
    """True when install_comfyui.sh finished for this host dir (tests can skip otherwise)."""
    d = Path(host_dir) if host_dir else default_host_dir(version)
    return (d / "main.py").is_file() and (d / ".pipefusion-host-ok").is_file()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServerError(RuntimeError):
    pass


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 in its own process session; a context manager."""

    def __init__(self, host_dir, base_dir, custom_nodes=None, extra_args=(),
                 startup_timeout: float = 120.0, python: str = sys.executable, env=None):
        self.host_dir = Path(host_dir).resolve()
        self.base_dir = Path(base_dir).resolve()
        self.custom_nodes = dict(custom_nodes or {})
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.python = python
        self.env = dict(env) if env is not None else None
        self.log_path = self.base_dir / "comfyui.log"
        self.port = None
        self._proc = None
        self._log = None

    # ---- lifecycle ---------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self):
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self):
        if not (self.host_dir / "main.py").is_file():
            raise ComfyServerError(f"no ComfyUI at {self.host_dir}; run tests/host/install_comfyui.sh")
        self._make_layout()
        for attempt in range(3):  # retry only if the picked port was taken meanwhile
            try:
                self._spawn_and_wait()
                return self
            except ComfyServerError:
                self.stop()
                if attempt == 2 or "address already in use" not in self.log_tail(20).lower():
                    raise

    def _make_layout(self):
        for sub in BASE_LAYOUT:
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for name, target in self.custom_nodes.items():
            link = self.base_dir / "custom_nodes" / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(target).resolve(), target_is_directory=True)

    def _spawn_and_wait(self):
        self.port = _free_port()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), *self.extra_args]
        if not any(a.startswith("--database-url") for a in self.extra_args):
            # the default DB lives in <host_dir>/user/, which the installed tree lacks
            cmd += ["--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        site = self.host_dir / ".pipefusion-site"
        if site.is_dir():  # the pinned packages of a non-default release (install_comfyui.sh)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {' '.join(cmd)}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(cmd, cwd=self.host_dir, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ComfyServerError(f"ComfyUI exited with {self._proc.returncode} during startup:\n"
                                       + self.log_tail())
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, ComfyServerError):
                time.sleep(0.25)
        raise ComfyServerError(f"ComfyUI did not answer within {self.startup_timeout}s:\n" + self.log_tail())

    def stop(self, timeout: float = 15.0):
        """SIGTERM the whole process group, SIGKILL what is left after `timeout`."""
        proc, self._proc = self._proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the leader's pid is the group id
            self._signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self._signal_group(pgid, 0) and time.monotonic() < deadline:
                proc.poll()  # reap the leader so its zombie does not keep the group alive
                time.sleep(0.1)
            self._signal_group(pgid, signal.SIGKILL)
            proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _signal_group(pgid, sig) -> bool:
        """Send sig to the group; False when no process of it is left."""
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:
            return False

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    # ---- HTTP / websocket ----------------------------------------------------
    def _request(self, method, path, body=None, timeout=30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, ctype = r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raise ComfyServerError(f"{method} {path} -> HTTP {e.code}: "
                                   f"{e.read().decode(errors='replace')[:4000]}") from None
        if "json" in ctype:
            return json.loads(raw) if raw else None
        return raw

    def get(self, path, timeout=30.0):
        """GET; decoded JSON for JSON responses, else bytes."""
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path, obj, timeout=30.0):
        return self._request("POST", path, obj, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue_prompt(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt_id (HTTP 400 with node_errors raises)."""
        body = {"prompt": prompt}
        if client_id:
            body["client_id"] = client_id
        return self.post_json("/prompt", body)["prompt_id"]

    def interrupt(self, prompt_id: str | None = None):
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def ws_connect(self, client_id: str, timeout: float = 30.0):
        """A websocket-client WebSocket on /ws; recv() gives JSON text or binary preview frames."""
        import websocket  # websocket-client, installed by install_comfyui.sh

        return websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)

    def wait_for_prompt(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll /history until the prompt is finished; returns its history entry
        (entry["status"]["status_str"] is "success" or "error")."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}:\n" + self.log_tail())
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # ComfyUI adds a prompt to history once it has finished
                return entry
            if time.monotonic() > deadline:
                raise ComfyServerError(f"prompt {prompt_id} not done after {timeout}s:\n" + self.log_tail())
            time.sleep(0.1)
