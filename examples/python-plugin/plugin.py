"""echo.v1.Echo in Python: a mesh plugin that is an ordinary grpcio server.

Nothing here is mesh-specific beyond reading the plugin contract's environment variables
(docs/plugin-guide.md): listen on PLUGIN_SOCKET, answer grpc.health.v1.Health with SERVING
once serving, serve reflection so grpcurl works, drain on SIGTERM.

Run ./setup.sh first: it makes the virtualenv and generates the echo.v1 stubs into it.
"""

import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from echo.v1 import echo_pb2, echo_pb2_grpc

# How long SIGTERM waits for calls in flight; keep it under the plugin's stop_grace.
DRAIN_SECONDS = 3.0


class Echo(echo_pb2_grpc.EchoServicer):
    """Every reply names the instance that answered."""

    def __init__(self, instance):
        self.instance = instance

    def _reply(self, message):
        return echo_pb2.EchoReply(message=message, instance=self.instance)

    def Echo(self, request, context):
        return self._reply(request.message)

    def Expand(self, request, context):
        for _ in range(request.count):
            yield self._reply(request.message)

    def Collect(self, request_iterator, context):
        return self._reply(" ".join(r.message for r in request_iterator))

    def Chat(self, request_iterator, context):
        for request in request_iterator:
            yield self._reply(request.message)


def add_reflection_v1(server, reflector):
    """grpcio-reflection serves v1alpha only (what grpcurl 1.8.6 speaks); newer tools ask for
    grpc.reflection.v1, whose messages are the same on the wire: route it to the same
    servicer."""
    handler = grpc.stream_stream_rpc_method_handler(
        reflector.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(
            "grpc.reflection.v1.ServerReflection", {"ServerReflectionInfo": handler}),))


def main():
    try:
        socket = os.environ["PLUGIN_SOCKET"]
        instance = os.environ["PLUGIN_INSTANCE"]
    except KeyError as missing:
        print(f"python-plugin: {missing} is not set; run it under mesh up, or by hand with "
              "PLUGIN_SOCKET=/tmp/py.sock PLUGIN_INSTANCE=py-dev", file=sys.stderr)
        return 64

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(instance), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        "grpc.reflection.v1.ServerReflection",
    )
    reflector = reflection.ReflectionServicer(services)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflector, server)
    add_reflection_v1(server, reflector)

    server.add_insecure_port(f"unix:{socket}")
    server.start()
    # Ready: the manager's health check now answers SERVING.
    for service in ("", services[0]):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"{instance}: serving echo.v1.Echo on {socket}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    # Drain: out of routing first, then finish the calls in flight.
    health_servicer.enter_graceful_shutdown()
    server.stop(DRAIN_SECONDS).wait()
    print(f"{instance}: drained, exiting", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
