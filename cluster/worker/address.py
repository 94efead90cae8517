"""The address a worker registers: one that routers and other workers on other nodes can dial.

A worker binds `host` (127.0.0.1 under `pdserve serve`; 0.0.0.0 under `pdserve launch`) and
registers `advertise_host:port`. Without an advertise host, a wildcard bind registers the node's
IP (the address its Ray node registered, inside a Ray worker), never 0.0.0.0. The KV service is on the same gRPC
server, so the KV address a prefill worker hands out (KVHandle.kv_address) is the same one.
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable

logger = logging.getLogger(__name__)

WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def advertised_host(bind_host: str, advertise_host: str | None, node_ip: Callable[[], str]) -> str:
    """Pure choice: the configured advertise host, else the bind host unless it is a wildcard,
    else `node_ip()`. IPv6 literals come back bracketed, ready for `host:port`."""
    host = advertise_host or (bind_host if bind_host not in WILDCARDS else node_ip())
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def node_ip() -> str:
    """This node's IP: the one its Ray node registered (other nodes reach it there) inside a Ray
    process, else the address of the interface holding the default route, else the hostname's."""
    try:
        import ray

        if ray.is_initialized():
            # The address the node registered with Ray (`ray start --node-ip-address`), which
            # its peers reach it at; ray.util.get_node_ip_address() in a worker process guesses
            # from the default route instead.
            node_id = ray.get_runtime_context().get_node_id()
            for node in ray.nodes():
                if node.get("NodeID") == node_id and node.get("NodeManagerAddress"):
                    return node["NodeManagerAddress"]
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks the route's source
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
