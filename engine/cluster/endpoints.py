"""Endpoints: where a client's connection leads (cluster, reader, instance:NAME, custom:NAME).

``Endpoints`` (a part of the control plane, engine/cluster/control_plane.py) answers the
Control service's ResolveEndpoint, which engine/client.py's ClusterClient asks at start
and after a failure, and keeps the custom endpoints of topology.json:

- ``cluster``: the writer;
- ``reader``: every replica that is up, by name (the client takes them in turn), else the
  writer;
- ``instance:NAME``: that instance, whatever its role;
- ``custom:NAME``: the members that are up, replicas preferred (a member that is the
  writer is used only when no replica member is up).

Each answer also says who the writer is, a generation (the failover count) and whether a
writer is possible (it runs, a failover is in progress, or a replica could be promoted),
so a client waiting for a new writer knows when to stop waiting.
"""

from __future__ import annotations

import re

from aurora_pb import control_pb2 as pb
from engine.cluster.state import ActionError, ClusterState, Managed, NotFoundError, PreconditionError, log

ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class Endpoints(ClusterState):
    """Resolve endpoints; create, delete and list the custom ones (see the module doc)."""

    def _target(self, p: Managed) -> pb.EndpointTarget:
        return pb.EndpointTarget(instance=p.name, address=p.address, role=p.role,
                                 up=p.state == "up" and p.alive)

    def resolve(self, endpoint: str) -> pb.ResolveReply:
        kind, _, name = endpoint.partition(":")
        writer = self.procs[self.writer]
        if kind == "cluster" and not name:
            targets = [writer]
        elif kind == "reader" and not name:
            targets = [p for p in self.replicas if p.state == "up" and p.alive
                       and not p.draining] or [writer]
            targets.sort(key=lambda p: p.name)
        elif kind == "instance" and name:
            targets = [self.get_instance(name)]
        elif kind == "custom" and name:
            members = self._custom(name)
            up = [self.procs[m] for m in members if self.procs[m].state == "up" and self.procs[m].alive]
            targets = [p for p in up if p.role == "replica"] or up
            if not targets:
                raise PreconditionError(f"no member of custom endpoint {name!r} is up "
                                        f"({', '.join(members) or 'it has no members'})")
        else:
            raise ActionError(f"bad endpoint {endpoint!r}: cluster, reader, instance:NAME or custom:NAME")
        writer_possible = (writer.state != "down" or self.failing_over
                           or bool(self.candidates()))
        return pb.ResolveReply(endpoint=endpoint, targets=[self._target(p) for p in targets],
                               writer=writer.name, writer_address=writer.address,
                               generation=self.failovers, failing_over=self.failing_over,
                               writer_possible=writer_possible)

    def _custom(self, name: str) -> list[str]:
        members = self.topology.endpoints.get(name)
        if members is None:
            known = ", ".join(sorted(self.topology.endpoints)) or "none"
            raise NotFoundError(f"no custom endpoint named {name!r} (custom endpoints: {known})")
        return members

    def create_endpoint(self, name: str, members: list[str]) -> pb.EndpointInfo:
        self._check_running()
        if not ENDPOINT_NAME_RE.match(name) or name in ("cluster", "reader"):
            raise ActionError(f"bad endpoint name {name!r}: 1-40 of a-z, 0-9 and '-', "
                              f"not 'cluster' or 'reader'")
        if name in self.topology.endpoints:
            raise PreconditionError(f"custom endpoint {name!r} exists (members "
                                    f"{', '.join(self.topology.endpoints[name])}); delete it first")
        members = list(dict.fromkeys(m.strip() for m in members if m.strip()))
        if not members:
            raise ActionError("a custom endpoint needs at least one member (--members db2,db3)")
        for m in members:
            self.get_instance(m)
        self.topology.endpoints[name] = members
        self.save_topology()
        log.info("custom endpoint %s created: %s", name, ", ".join(members))
        return self.endpoint_info(f"custom:{name}")

    def delete_endpoint(self, name: str) -> pb.EndpointInfo:
        self._check_running()
        info = self.endpoint_info(f"custom:{name}")
        del self.topology.endpoints[name]
        self.save_topology()
        log.info("custom endpoint %s deleted", name)
        return info

    def endpoint_info(self, endpoint: str) -> pb.EndpointInfo:
        kind, _, name = endpoint.partition(":")
        members = list(self._custom(name)) if kind == "custom" else []
        try:
            targets = list(self.resolve(endpoint).targets)
        except PreconditionError:
            targets = []
        return pb.EndpointInfo(name=endpoint, kind=kind, members=members, targets=targets)

    def list_endpoints(self) -> pb.EndpointList:
        names = ["cluster", "reader"] + [f"instance:{p.name}" for p in sorted(self.instances, key=lambda p: p.name)]
        names += [f"custom:{n}" for n in sorted(self.topology.endpoints)]
        return pb.EndpointList(endpoints=[self.endpoint_info(n) for n in names])
