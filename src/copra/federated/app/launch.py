"""Commands, environment and credentials for Flower's deployment engine, offline (tests, one-machine trials).

On real machines run the same commands by hand (docs/federated.md: "On real machines").
What flwr 1.42 expects, read from its `--help` and source:

  * SuperLink: one HTTP port (`--host`, `--port`) serves the Fleet, Control and Runtime APIs; TLS
    with `--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile` (the certificate's subjectAltName must
    name the address the SuperNodes and the SuperLink's own ServerApp runner dial), else
    `--insecure`. `--enable-supernode-auth` admits only SuperNodes whose public key was registered
    with `flwr supernode register KEY.pub` (an ECDSA NIST-curve OpenSSH key).
  * SuperNode: `--superlink HOST:PORT`, `--root-certificates ca.crt` (or `--insecure`),
    `--auth-supernode-private-key KEY`, `--node-config`, and its own `--port` for its ClientApps.
  * `flwr run APP CONNECTION`: the connection (address, `root-certificates` or `insecure`) lives in
    `$FLWR_HOME/config.toml`.

Every process gets FLWR_TELEMETRY_ENABLED=0 and FLWR_DISABLE_UPDATE_CHECK=1 (`flower_env`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from copra.federated.flower import FLOWER_ENV
from copra.utils.errors import UserError


def flower_env(flwr_home: str | Path | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment for a Flower process: no telemetry or update check, this Python's scripts on PATH.

    The SuperLink and SuperNodes start `flower-superexec` by name, so the venv's bin folder goes first.
    """
    env = dict(os.environ if base is None else base) | FLOWER_ENV
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def tool(name: str) -> str:
    """Full path of a Flower command beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise UserError(f"{name} not found: pip install 'copra-lora[federated]'")
    return found


@dataclass(frozen=True)
class Tls:
    """A self-made CA and the SuperLink's certificate signed by it (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def superlink_command(
    port: int,
    host: str = "127.0.0.1",
    tls: Tls | None = None,
    node_auth: bool = False,
    database: str | Path | None = None,
) -> list[str]:
    """`flower-superlink` serving Fleet, Control and Runtime APIs on host:port, no runtime `uv sync`."""
    command = [
        tool("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    if node_auth:
        command.append("--enable-supernode-auth")
    if database is not None:
        command += ["--database", str(database)]
    return command


def supernode_command(
    superlink: str,
    port: int,
    partition: int,
    partitions: int,
    root_cert: Path | None = None,
    private_key: Path | None = None,
    max_wait: float | None = None,
) -> list[str]:
    """`flower-supernode` for partition `partition` of `partitions`; its ClientApps talk to 127.0.0.1:port."""
    command = [
        tool("flower-supernode"),
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        f"partition-id={partition} num-partitions={partitions}",
    ]
    command += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    if max_wait is not None:
        command += ["--max-wait-time", f"{max_wait:g}"]
    return command


def write_connection(flwr_home: str | Path, name: str, address: str, root_cert: Path | None = None) -> Path:
    """`$FLWR_HOME/config.toml` with one default SuperLink connection (what `flwr run APP NAME` reads)."""
    security = "insecure = true" if root_cert is None else f"root-certificates = {str(root_cert)!r}"
    text = f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n'
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _run(command: list[str]) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"{command[0]} not found") from None
    except subprocess.CalledProcessError as error:
        raise UserError(f"{' '.join(command[:2])} failed: {error.stderr.strip().splitlines()[-1:]}") from None


def make_tls(folder: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30) -> Tls:
    """A CA and a SuperLink certificate for `hosts` (IPs or DNS names), made offline with openssl (EC P-256)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.pem"))
    names = ",".join(("IP:" if h.replace(".", "").isdigit() or ":" in h else "DNS:") + h for h in hosts)
    ext = folder / "server.ext"
    ext.write_text(
        f"subjectAltName={names}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
            "-days",
            str(days),
            "-subj",
            "/CN=copra-flower-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )
    _run(
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={hosts[0]}",
        ]
    )
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            str(days),
            "-sha256",
            "-extfile",
            str(ext),
        ]
    )
    return Tls(ca, cert, key)


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """A SuperNode key pair (ECDSA P-384, OpenSSH format) made offline with ssh-keygen: (private, public)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", path.name, "-f", str(path)])
    return path, path.with_name(path.name + ".pub")
