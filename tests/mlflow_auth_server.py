"""A local MLflow tracking server with authentication (`mlflow server --app-name basic-auth`),
for tests that need the credentials path of a cluster job: wrong credentials must fail at
start-up, right ones must log.

    with mlflow_auth_server(tmp_path) as server:
        server.uri                       # http://127.0.0.1:<port>
        server.username, server.password  # the admin user the server created
        server.env()                     # MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD for a job

What the basic-auth app needs in MLflow 3.17.2 (mlflow/server/auth): the Flask-WTF package
(`mlflow[auth]`, a project dependency), a static `MLFLOW_FLASK_SERVER_SECRET_KEY`, and an
admin password (MLflow ships none: MLFLOW_AUTH_ADMIN_PASSWORD, at least 12 characters). Its
user store is a sqlite file named by an auth config file (MLFLOW_AUTH_CONFIG_PATH), here in
the test's folder, so nothing is written to the working directory.

The server listens on 127.0.0.1 only, runs in its own process group (MLflow 3 leaves helper
processes otherwise) and is stopped by that group's id (`orchestrator.tracking.ui.stop_ui`).
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.tracking.ui import server_command, stop_ui, wait_until_ready

ADMIN_USER = "lethe-admin"


@dataclass
class AuthServer:
    uri: str
    username: str
    password: str
    proc: subprocess.Popen
    log_path: Path

    def env(self) -> dict[str, str]:
        """The variables a job (or the CLI) needs to log into this server."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_auth_server(folder: str | Path, *, port: int | None = None,
                      timeout: float = 120.0) -> AuthServer:
    """Start the server on a sqlite store in `folder`; returns once /health answers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ini = folder / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{(folder / 'basic_auth.db').resolve()}\n"
                   f"admin_username = {ADMIN_USER}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    password = secrets.token_urlsafe(18)  # >= 12 characters, MLflow's minimum
    port = port or free_port()
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN_USER,
                "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    cmd = server_command(f"sqlite:///{(folder / 'mlflow.db').resolve()}", "127.0.0.1", port,
                         folder / "mlartifacts") + ["--app-name", "basic-auth"]
    log_path = folder / "server.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(uri, proc, timeout)
    except BaseException:
        stop_ui(proc)
        raise
    return AuthServer(uri, ADMIN_USER, password, proc, log_path)


@contextmanager
def mlflow_auth_server(folder: str | Path, **kwargs: object) -> Iterator[AuthServer]:
    server = start_auth_server(folder, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop_ui(server.proc)
