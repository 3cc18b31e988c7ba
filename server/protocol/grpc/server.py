"""The gRPC server beside the HTTP app: grpcio's asyncio server in the same process and event loop, on
PROMPTKD_GRPC_HOST:PROMPTKD_GRPC_PORT, serving GRPCInferenceService (servicer.py) and the standard grpc.health.v1
health service (what Kubernetes' gRPC probes call: SERVING once a model version is ready).

Its limits are the HTTP side's: a message over PROMPTKD_MAX_REQUEST_BYTES is refused (RESOURCE_EXHAUSTED) by gRPC
before it is handed over; every other limit and the memory budget are the Service's. ModelInfer's message must
arrive within PROMPTKD_REQUEST_TIMEOUT_S, and at most PROMPTKD_MAX_QUEUE_IMAGES + 64 of its calls are open at once
(servicer.py); health and metadata calls are never refused for want of room. Connections that stall are
closed by keepalive pings (a peer that stops answering them within 20 s is dropped, and its half-received messages
with it), and a connection that has lived 30 minutes is told to reconnect (GOAWAY), which also spreads long-lived
clients over the replicas behind a load balancer.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..dataplane import Service
from .servicer import SERVICE_NAME, Servicer

log = logging.getLogger("promptkd.server")
HEALTH_POLL_S = 1.0
MAX_STREAMS = 100


def listen_address(host: str, port: int) -> str:
    """host:port as gRPC reads it: an IPv6 address in brackets (PROMPTKD_GRPC_HOST=:: as uvicorn's --host ::)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcServer:
    """Started and stopped by the HTTP app's lifespan (main.py)."""

    def __init__(self, service: Service, version: str, interceptors: list = ()) -> None:
        settings = service.settings
        self.service = service
        self.address = listen_address(settings.grpc_host, settings.grpc_port)
        self.grace_s = settings.request_timeout_s
        self.server = grpc.aio.server(interceptors=list(interceptors), options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", -1),  # answers are the server's own: outputs of bounded requests
            ("grpc.max_concurrent_streams", MAX_STREAMS),  # per connection: no one connection takes every call
            ("grpc.so_reuseport", 0),  # a port in use is an error at start-up, not two servers sharing it
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_connection_age_ms", 30 * 60_000),
            ("grpc.max_connection_age_grace_ms", int(1000 * settings.request_timeout_s)),
        ])
        self.server.add_generic_rpc_handlers([Servicer(service, version).handlers()])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            port = self.server.add_insecure_port(self.address)
        except RuntimeError as err:
            raise RuntimeError(f"cannot listen for gRPC on {self.address} (PROMPTKD_GRPC_HOST, PROMPTKD_GRPC_PORT; "
                               f"0 turns gRPC off): {err}") from None
        await self.server.start()
        self._watch = asyncio.create_task(self._report_health())
        log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s", self.address.rsplit(":", 1)[0] + f":{port}")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_s)  # calls in flight get the time a request may wait for the engine

    async def _report_health(self) -> None:
        """grpc.health.v1 follows readiness ("" and the inference service: SERVING while a model version is ready
        and the engine lives, else NOT_SERVING), checked every second."""
        while True:
            serving = self.service.ready and self.service.health_failure() is None
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)
            await asyncio.sleep(HEALTH_POLL_S)
