"""The control plane's calls to the processes it runs: one client helper, the only place
in the control plane that opens channels to storage nodes and instances.

Every call the supervisor, the failover logic and `status` make to another process goes
through ``ProcessRpc``, over the transport seam (engine/transport): health checks, a
storage node's NodeStatus, an instance's Status, and InstanceAdmin's Promote, Follow
and SetCapacity.
A failed call raises ``engine.errors.RpcError`` (its status and detail), so the modules
that decide what to do (engine/cluster/failover.py, state.py, supervision.py) never touch
a transport library's object. One channel per process name, reused across calls and
closed when the process is removed or the control plane stops.
"""

from __future__ import annotations

from aurora_pb import database_pb2, storage_pb2
from engine.transport import Channel, Transport, service_of

STORAGE = service_of(storage_pb2, "Storage")
DATABASE = service_of(database_pb2, "Database")
INSTANCE_ADMIN = service_of(database_pb2, "InstanceAdmin")


class ProcessRpc:
    """Channels to the cluster's processes, by name, and the calls the control plane makes."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._channels: dict[str, Channel] = {}

    def _channel(self, name: str, address: str) -> Channel:
        channel = self._channels.get(name)
        if channel is None or channel.address != address:
            channel = self._channels[name] = self.transport.channel(address)
        return channel

    async def health(self, name: str, address: str, timeout_s: float) -> bool:
        """True if the process answers SERVING; any failure is False."""
        return await self._channel(name, address).serving("", timeout_s=timeout_s)

    async def node_status(self, name: str, address: str, timeout_s: float):
        """A storage node's NodeStatus reply (storage.proto)."""
        return await self._channel(name, address).stub(STORAGE).NodeStatus(
            storage_pb2.NodeStatusRequest(), timeout_s=timeout_s)

    async def instance_status(self, name: str, address: str, timeout_s: float):
        """An instance's Database.Status reply (database.proto): role, VDL, epoch, JSON."""
        return await self._channel(name, address).stub(DATABASE).Status(
            database_pb2.StatusRequest(), timeout_s=timeout_s)

    async def promote(self, name: str, address: str, timeout_s: float):
        """InstanceAdmin.Promote: the replica runs recovery under a new volume epoch and
        takes writes (invariant 10). Returns the PromoteReply."""
        return await self._channel(name, address).stub(INSTANCE_ADMIN).Promote(
            database_pb2.PromoteRequest(), timeout_s=timeout_s)

    async def follow(self, name: str, address: str, writer_address: str, timeout_s: float) -> None:
        """InstanceAdmin.Follow: the instance becomes (or stays) a replica of writer_address."""
        await self._channel(name, address).stub(INSTANCE_ADMIN).Follow(
            database_pb2.FollowRequest(writer_address=writer_address), timeout_s=timeout_s)

    async def set_capacity(self, name: str, address: str, acu: float, timeout_s: float):
        """InstanceAdmin.SetCapacity: the instance resizes its buffer pool and admission
        limit in place (docs/serverless.md). Returns the SetCapacityReply."""
        return await self._channel(name, address).stub(INSTANCE_ADMIN).SetCapacity(
            database_pb2.SetCapacityRequest(acu=acu), timeout_s=timeout_s)

    async def set_segment_membership(self, name: str, address: str, volume: str, pg: int,
                                     epoch: int, members, timeout_s: float) -> int:
        """Storage.SetMembership: the segment adopts membership ``epoch`` (invariant 16)."""
        reply = await self._channel(name, address).stub(STORAGE).SetMembership(
            storage_pb2.SetMembershipRequest(volume=volume, pg=pg, membership_epoch=epoch,
                                             members=list(members)), timeout_s=timeout_s)
        return reply.membership_epoch

    async def create_segments(self, name: str, address: str, info, pgs, timeout_s: float) -> None:
        """Storage.CreateVolume for the PGs ``pgs`` of the volume ``info`` (a peer's
        VolumeInfo): the new, empty segments of a wiped node (docs/membership.md)."""
        await self._channel(name, address).stub(STORAGE).CreateVolume(
            storage_pb2.CreateVolumeRequest(
                volume=info.volume, pg_count=info.pg_count, stripe_pages=info.stripe_pages,
                volume_epoch=info.volume_epoch, pgs=list(pgs), pg_pages=info.pg_pages,
                stripe_width=info.stripe_width), timeout_s=timeout_s)

    async def set_writer_membership(self, name: str, address: str, pg: int, epoch: int,
                                    members, new_members, forget, timeout_s: float) -> int:
        """InstanceAdmin.SetMembership: the writer's quorum core moves to ``epoch``."""
        reply = await self._channel(name, address).stub(INSTANCE_ADMIN).SetMembership(
            database_pb2.InstanceMembershipRequest(
                pg=pg, membership_epoch=epoch, members=list(members),
                new_members=list(new_members or ()), forget=list(forget)), timeout_s=timeout_s)
        return reply.membership_epoch

    async def close(self, name: str) -> None:
        channel = self._channels.pop(name, None)
        if channel is not None:
            await channel.close()

    async def close_all(self) -> None:
        for name in list(self._channels):
            await self.close(name)
