"""Start the real Milvus engine (PyPI ``milvus==2.3.5``) on the ports we choose, in place.

Run with the interpreter of the Milvus tool environment (``make milvus-engine`` installs it
in ``var/tools/milvus``), never imported by the platform: it needs only the standard library
and that package. ``ops.processes.milvus_engine_process`` builds its command line.

Why not the package's own ``milvus-server`` command: it unpacks ~250 MB of binaries into every
data directory, picks the health/metrics port (9091 and up) by itself without a flag, leaves
the embedded etcd on 2379/2380 whatever ``--etcd-port`` says (only the client's endpoint
moves), and on SIGINT kills the engine one second after asking it to stop. Here the binaries
are unpacked once (``--home``, md5-checked under a lock), every listening port is ours (the
embedded etcd's through its own config file, ``etcd.config.path``), and the process
``exec``s the engine, so the pid the caller holds is the engine and SIGTERM stops it
gracefully.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

#: The engine's listening ports other than the public ones, as the package's config template
#: names them; each gets a free port (checked on loopback; the 2.3 components listen on every
#: interface).
INTERNAL_PORTS = (
    "proxy_internal_port",
    "root_coord_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)

#: The components of the standalone process, as milvus.yaml names them ("<role>.ip").
ROLES = (
    "rootCoord",
    "proxy",
    "queryCoord",
    "queryNode",
    "indexCoord",
    "indexNode",
    "dataCoord",
    "dataNode",
)


BIND_ATTEMPTS = 5  # fresh draws of the internal ports when one was taken meanwhile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _internal_ports(path: Path) -> dict[str, int]:
    """Free ports for the internal listeners, the same as last time on this data where still
    free: a restart on new ports waits ~1 min until the sessions the components registered in
    etcd under the old addresses expire."""
    names = (*INTERNAL_PORTS, "etcd_port", "etcd_peer_port")
    try:
        previous = {k: int(v) for k, v in json.loads(path.read_text()).items() if k in names}
    except (OSError, ValueError, AttributeError):
        previous = {}
    ports = {}
    for name in names:
        port = previous.get(name, 0)
        ports[name] = port if port and _is_free(port) else _free_port()
    path.write_text(json.dumps(ports))
    return ports


def _is_free(port: int) -> bool:
    """Nothing listens there (TIME_WAIT connections of a killed engine do not count: the
    engine's Go listeners bind with SO_REUSEADDR as well)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _config_class(milvus: Any) -> Any:
    """The package's config writer, its port check made to agree with :func:`_is_free` (it
    binds without SO_REUSEADDR, so it refuses the port of an engine just killed, which a
    restart after a crash must take again)."""

    class Config(milvus.MilvusServerConfig):  # type: ignore[misc]
        def try_bind_port(self, port: int) -> socket.socket | None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:
                sock.close()
                return None
            return sock

    return Config


def _etcd_config(path: Path, client_port: int, peer_port: int) -> Path:
    """The embedded etcd's own config (etcd's config-file format): loopback, our ports."""
    client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    path.write_text(
        "name: default\n"
        f"listen-client-urls: {client}\n"
        f"advertise-client-urls: {client}\n"
        f"listen-peer-urls: {peer}\n"
        f"initial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: default={peer}\n"
    )
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="data, config and log dir")
    parser.add_argument("--home", type=Path, required=True, help="where the binaries unpack")
    parser.add_argument("--port", type=int, required=True, help="gRPC (proxy) port")
    parser.add_argument("--metrics-port", type=int, required=True, help="/healthz, /metrics")
    parser.add_argument("--etcd-port", type=int, default=0, help="embedded etcd client port")
    parser.add_argument("--etcd-peer-port", type=int, default=0, help="embedded etcd peer port")
    args = parser.parse_args(argv)

    import milvus  # the tool environment's package; not installed in the platform's .venv

    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".unpack.lock").open("w") as lock:  # concurrent first starts unpack once
        fcntl.flock(lock, fcntl.LOCK_EX)
        milvus._initialize_data_files(str(home))

    data = args.data.resolve()
    (data / "configs").mkdir(parents=True, exist_ok=True)
    port_file = data / "configs" / "ports.json"
    for attempt in range(BIND_ATTEMPTS):
        ports = _internal_ports(port_file)
        etcd_port = args.etcd_port or ports.pop("etcd_port")
        etcd_peer_port = args.etcd_peer_port or ports.pop("etcd_peer_port")
        ports = {name: ports[name] for name in INTERNAL_PORTS}
        # Ports given as constructor arguments are bound strictly (an error if taken), instead
        # of "the first free one from here" as for the template's defaults.
        config = _config_class(milvus)(
            data_dir=str(data), proxy_port=args.port, etcd_port=etcd_port, **ports
        )
        try:
            config.resolve()  # writes data/configs/milvus.yaml
            break
        except RuntimeError as exc:
            # A port free when drawn was taken before the package bound it (other processes
            # open ports all the time, Ray's workers for one): draw them all afresh.
            if "bind failed" not in str(exc) or attempt == BIND_ATTEMPTS - 1:
                raise
            port_file.unlink(missing_ok=True)
    etcd = _etcd_config(data / "configs" / "etcd.yaml", etcd_port, etcd_peer_port)
    exe = home / "bin" / "milvus"
    env = {
        **os.environ,
        "DEPLOY_MODE": "STANDALONE",
        "METRICS_PORT": str(args.metrics_port),
        "MILVUS_RUN_DIR": str(data / "run"),
        # Milvus reads every setting from the environment too ("a.b.c" = A_B_C): the embedded
        # etcd's config file, and the address each component registers for the others
        # (else the host's first interface address, which a laptop may not route).
        "ETCD_CONFIG_PATH": str(etcd),
        **{f"{role.upper()}_IP": "127.0.0.1" for role in ROLES},
        # A stopping standalone stops its coordinators first, and its nodes then retry them
        # until this many seconds have passed (default 1800).
        "COMMON_GRACEFULSTOPTIMEOUT": "3",
        "LD_LIBRARY_PATH": ":".join([str(exe.parent), os.environ.get("LD_LIBRARY_PATH", "")]),
    }
    os.chdir(data)  # the engine reads ./configs/milvus.yaml
    os.execve(exe, [str(exe), "run", "standalone"], env)


if __name__ == "__main__":
    main()
