"""The control plane's service face: the Control service (proto/aurora_pb/control.proto).

A thin layer over the plain logic of engine/cluster/control_plane.py: each method turns a
request into one call of ControlPlane and its result into a reply. The control plane's
refusals become the documented status codes: NotFoundError -> NOT_FOUND,
PreconditionError -> FAILED_PRECONDITION, any other ActionError -> INVALID_ARGUMENT.
``start_server`` binds and starts the server through the transport seam (engine/transport);
the handlers are plain async methods, and no module of the control plane imports grpc.
"""

from __future__ import annotations

import asyncio

from aurora_pb import control_pb2 as pb
from engine.errors import RpcError
from engine.transport import Transport, service_of
from engine.cluster.launcher import STOP_GRACE_S
from engine.cluster.state import PROBE_TIMEOUT_S, ActionError, NotFoundError, PreconditionError


class ControlService:
    """The Control service's handlers over ControlPlane (proto/aurora_pb/control.proto)."""

    def __init__(self, cp) -> None:
        self.cp = cp   # engine.cluster.control_plane.ControlPlane

    async def GetState(self, request, context):
        timeout_s = (request.probe_timeout_ms or PROBE_TIMEOUT_S * 1000) / 1000.0
        return await self.cp.collect(timeout_s, probes=not request.skip_probes)

    async def ProcessAction(self, request, context):
        message = await self._call(context, self.cp.action, request.name, request.action, request.wait_s)
        state = await self.cp.collect(probes=False)
        return pb.ActionReply(message=message,
                              processes=[s for s in state.processes if s.name == request.name])

    async def AzAction(self, request, context):
        try:
            message = await self.cp.az_action(request.az, request.action, request.wait_s)
        except ActionError as exc:
            raise RpcError("INVALID_ARGUMENT", str(exc))
        state = await self.cp.collect(probes=False)
        return pb.ActionReply(message=message,
                              processes=[s for s in state.processes
                                         if s.role == "storage" and s.az == request.az])

    async def SetNetworkDelay(self, request, context):
        try:
            message = self.cp.set_network_delay(request.az, request.ms, request.clear, request.node)
        except ActionError as exc:
            raise RpcError("INVALID_ARGUMENT", str(exc))
        return pb.NetworkReply(message=message, latency=self.cp.latency_message())

    async def _call(self, context, fn, *args, **kwargs):
        """Run an action; its refusals become the documented gRPC codes."""
        try:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except NotFoundError as exc:
            raise RpcError("NOT_FOUND", str(exc))
        except PreconditionError as exc:
            raise RpcError("FAILED_PRECONDITION", str(exc))
        except ActionError as exc:
            raise RpcError("INVALID_ARGUMENT", str(exc))

    async def Failover(self, request, context):
        return await self._call(context, self.cp.failover, request.target)

    async def AddReplica(self, request, context):
        tier = request.tier if request.HasField("tier") else None
        acus = ({"min_acu": request.min_acu, "max_acu": request.max_acu}
                if request.serverless else {})
        name, message = await self._call(context, self.cp.add_replica, tier, request.az,
                                         request.wait_s, **acus)
        state = await self.cp.collect(probes=False)
        return pb.ActionReply(message=message, processes=[s for s in state.processes if s.name == name])

    async def RemoveReplica(self, request, context):
        message = await self._call(context, self.cp.remove_replica, request.name)
        return pb.ActionReply(message=message)

    async def ResolveEndpoint(self, request, context):
        # A connection resumes an auto-paused instance first (docs/serverless.md).
        await self.cp.resume_for(request.endpoint or "cluster")
        return await self._call(context, self.cp.resolve, request.endpoint or "cluster")

    async def CreateEndpoint(self, request, context):
        return await self._call(context, self.cp.create_endpoint, request.name, list(request.members))

    async def DeleteEndpoint(self, request, context):
        return await self._call(context, self.cp.delete_endpoint, request.name)

    async def ListEndpoints(self, request, context):
        return await self._call(context, self.cp.list_endpoints)

    async def SetCapacityRange(self, request, context):
        message = await self._call(context, self.cp.set_capacity_range, request.name,
                                   request.min_acu, request.max_acu)
        return pb.ActionReply(message=message)

    async def ReplicaAutoscale(self, request, context):
        policy = None
        if not request.off:
            from engine.cluster.scaling import AutoscalePolicy
            policy = AutoscalePolicy(request.min_replicas, request.max_replicas,
                                     request.target_cpu_pct, request.scale_out_cooldown_s,
                                     request.scale_in_cooldown_s)
        return pb.ActionReply(message=await self._call(context, self.cp.set_autoscale, policy))

    async def Shutdown(self, request, context):
        if self.cp.stopping:
            raise RpcError("FAILED_PRECONDITION", "already shutting down")
        reports = await self.cp.shutdown(request.grace_s or STOP_GRACE_S)
        # Exit only after this reply is on its way.
        asyncio.get_running_loop().call_later(0.3, self.cp.stopped.set)
        return pb.ShutdownReply(reports=reports)


async def start_server(cp, host: str, port: int, transport: Transport):
    """Serve the Control service of ``cp`` on host:port (0: any free port) through
    ``transport``; the started server (its ``port`` is the one bound), or None if the
    address cannot be bound."""
    try:
        server = await transport.serve(host, port, {service_of(pb, "Control"): ControlService(cp)})
    except (OSError, RuntimeError):
        return None
    await server.set_serving(True)
    return server
