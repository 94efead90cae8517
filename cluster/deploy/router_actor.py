"""RouterActor: a router (cluster/router/standalone.py) run as a Ray actor by `pdserve launch`.

The same app as a `pdserve router` process; Ray only places it and keeps it alive. Its config
arrives as JSON-able data. The URL it reports uses the node's IP when it binds a wildcard.
"""
from __future__ import annotations

import logging
import os

import ray


@ray.remote
class RouterActor:
    def __init__(self, config: dict, port: int) -> None:
        from cluster.config import ClusterConfig

        self.config = ClusterConfig.model_validate({**config, "port": port})
        self.server = None
        self.url = ""
        logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def start(self) -> dict:
        """Serve (idempotent); returns {url, pid}."""
        if self.server is None:
            from cluster.router.standalone import RouterServer, build_standalone_app
            from cluster.worker.address import advertised_host, node_ip

            server = RouterServer(build_standalone_app(self.config), self.config.host, self.config.port)
            server.start()
            self.server = server
            self.url = f"http://{advertised_host(self.config.host, None, node_ip)}:{server.port}"
        return {"url": self.url, "pid": os.getpid()}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout_s=5.0)
            self.server = None

    def pid(self) -> int:
        return os.getpid()
