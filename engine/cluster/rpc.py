"""The control plane's calls to the processes it runs: one client helper, the only place
in the control plane that opens channels to storage nodes and instances.

Every call the supervisor, the failover logic and `status` make to another process goes
through ``ProcessRpc``: health checks (grpc.health.v1), a storage node's NodeStatus, an
instance's Status, and InstanceAdmin's Promote and Follow. A failed call raises
``RpcFailure`` (its gRPC status code's name and details), so the modules that decide what
to do (engine/cluster/failover.py, state.py, supervision.py) never touch a grpc object.
One channel per process name, reused across calls and closed when the process is removed
or the control plane stops.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aurora_pb import database_pb2, database_pb2_grpc
from aurora_pb import storage_pb2, storage_pb2_grpc

# Reconnect quickly: processes are killed and restarted on purpose.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


class RpcFailure(Exception):
    """A call to a process failed: ``code`` is the gRPC status code's name (UNAVAILABLE,
    DEADLINE_EXCEEDED, ...), ``details`` its text."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def _failure(exc: grpc.RpcError) -> RpcFailure:
    return RpcFailure(exc.code().name, exc.details())


class ProcessRpc:
    """Channels to the cluster's processes, by name, and the calls the control plane makes."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, name: str, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(name)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._channels[name] = channel
        return channel

    async def health(self, name: str, address: str, timeout_s: float) -> bool:
        """True if the process answers SERVING. A server without the health service still
        proves it is listening (UNIMPLEMENTED counts as serving); any other failure,
        including a malformed reply, is False."""
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel(name, address)).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNIMPLEMENTED
        except Exception:
            return False

    async def node_status(self, name: str, address: str, timeout_s: float):
        """A storage node's NodeStatus reply (storage.proto)."""
        try:
            return await storage_pb2_grpc.StorageStub(self._channel(name, address)).NodeStatus(
                storage_pb2.NodeStatusRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _failure(exc) from None

    async def instance_status(self, name: str, address: str, timeout_s: float):
        """An instance's Database.Status reply (database.proto): role, VDL, epoch, JSON."""
        try:
            return await database_pb2_grpc.DatabaseStub(self._channel(name, address)).Status(
                database_pb2.StatusRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _failure(exc) from None

    async def promote(self, name: str, address: str, timeout_s: float):
        """InstanceAdmin.Promote: the replica runs recovery under a new volume epoch and
        takes writes (invariant 10). Returns the PromoteReply."""
        try:
            return await database_pb2_grpc.InstanceAdminStub(self._channel(name, address)).Promote(
                database_pb2.PromoteRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _failure(exc) from None

    async def follow(self, name: str, address: str, writer_address: str, timeout_s: float) -> None:
        """InstanceAdmin.Follow: the instance becomes (or stays) a replica of writer_address."""
        try:
            await database_pb2_grpc.InstanceAdminStub(self._channel(name, address)).Follow(
                database_pb2.FollowRequest(writer_address=writer_address), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _failure(exc) from None

    async def close(self, name: str) -> None:
        channel = self._channels.pop(name, None)
        if channel is not None:
            await channel.close()

    async def close_all(self) -> None:
        for name in list(self._channels):
            await self.close(name)
