"""The simulated cluster: six storage nodes, a writer and a replica as objects of one process.

Every piece is the production code, started the way its process entry point starts it
(storage_node/server.py, engine/instance/server.py's ``serve``), over a SimTransport
(engine/sim/network.py) instead of gRPC:

    SimNode       StorageNode + StorageService + Gossip + Background on an LMDB dir
                  (on tmpfs); crash = cancel its tasks, drop the object, close LMDB
                  (what a commit made durable stays; queued work is lost); restart =
                  open the same dir again
    SimInstance   engine.instance.server.Instance with its Database, InstanceAdmin and
                  Replication services; a writer (recovery on start) or a replica
    SimCluster    the processes, their addresses, and the control plane's failover
                  decision: when the writer is down, the live replica is told to Promote
                  (InstanceAdmin.Promote, the call engine/cluster/failover.py makes) and
                  the old writer comes back as a replica that follows it

Addresses are ``<name>:<port>`` names only the simulated network knows.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os

from aurora_pb import database_pb2 as dpb
from aurora_pb import replication_pb2 as rpb
from aurora_pb import storage_pb2 as spb
from engine.format.cluster_config import ClusterConfig, Latency, NodeInfo
from engine.instance.server import (
    DatabaseService, Instance, InstanceAdminService, _ReplicationRouter)
from engine.sim.loop import SimProcess
from engine.sim.network import SimNetwork, SimTransport
from engine.transport import service_of
from storage_node.background import Background
from storage_node.gossip import Gossip
from storage_node.node import StorageNode, Tuning
from storage_node.service import StorageService

log = logging.getLogger(__name__)

NODES = [("sn1", "az-a"), ("sn2", "az-a"), ("sn3", "az-b"), ("sn4", "az-b"),
         ("sn5", "az-c"), ("sn6", "az-c")]
INSTANCES = [("db1", "az-a"), ("db2", "az-b")]
CLIENT = ("client", "az-a")
STORAGE_PORT = 7000
INSTANCE_PORT = 8000
BUFFER_POOL_PAGES = 256
#: The map size of a simulated node's LMDB environment (sparse on tmpfs).
SIM_MAP_SIZE = 256 << 20


class SimNode:
    """One storage node (see the module doc)."""

    def __init__(self, cluster: "SimCluster", name: str, az: str) -> None:
        self.cluster = cluster
        self.name = name
        self.az = az
        self.address = f"{name}:{STORAGE_PORT}"
        self.data_dir = os.path.join(cluster.base_dir, name)
        self.proc: SimProcess | None = None
        self.node: StorageNode | None = None
        self.server = None
        self.restarts = 0

    @property
    def up(self) -> bool:
        return self.proc is not None and not self.proc.dead

    async def start(self) -> None:
        self.proc = SimProcess(self.name)
        await self.proc.spawn(self._start())

    async def _start(self) -> None:
        c = self.cluster
        tuning = Tuning(map_size=SIM_MAP_SIZE)
        node = StorageNode(self.name, self.az, self.data_dir, tuning)
        await node.start()
        transport = SimTransport(c.net, self.proc)
        self.server = await transport.serve(self.name, STORAGE_PORT,
                                            {service_of(spb, "Storage"): StorageService(node)})
        peers = [n.address for n in c.nodes if n.name != self.name]
        seed = c.seed * 1009 + int(self.name[2:]) * 31 + self.restarts
        Gossip(node, peers, transport, seed=seed).start()
        Background(node, seed=seed + 1).start()
        await self.server.set_serving(True)
        self.node = node

    def crash(self) -> None:
        """The process dies: its tasks stop where they are, LMDB keeps what it committed."""
        if not self.up:
            return
        self.proc.kill()
        if self.server is not None:
            self.cluster.net.unregister(self.server)
        if self.node is not None:
            self.node.store.close()
        self.node = self.server = None

    async def restart(self) -> None:
        self.crash()
        self.restarts += 1
        await self.start()


class SimInstance:
    """One compute instance (writer or replica; see the module doc)."""

    def __init__(self, cluster: "SimCluster", name: str, az: str, volume: str | None = None) -> None:
        self.cluster = cluster
        self.name = name
        self.az = az
        self.address = f"{name}:{INSTANCE_PORT}"
        self.proc: SimProcess | None = None
        self.inst: Instance | None = None
        self.server = None
        #: A clone's writer (`clone start`) serves its own volume; None: the cluster's.
        self.volume = volume

    @property
    def config(self):
        c = self.cluster.config
        return c if self.volume is None else dataclasses.replace(c, volume=self.volume)

    @property
    def up(self) -> bool:
        return self.proc is not None and not self.proc.dead

    async def start(self, writer_address: str | None) -> None:
        self.proc = SimProcess(self.name)
        await self.proc.spawn(self._start(writer_address))

    async def _start(self, writer_address: str | None) -> None:
        c = self.cluster
        transport = SimTransport(c.net, self.proc)
        args = argparse.Namespace(instance=self.name, buffer_pool_pages=BUFFER_POOL_PAGES,
                                  backtrack_window=None, writer=writer_address)
        inst = Instance(args, self.config, transport)
        self.inst = inst
        service = DatabaseService(inst)
        inst.service = service
        self.server = await transport.serve(self.name, INSTANCE_PORT, {
            service_of(dpb, "Database"): service,
            service_of(dpb, "InstanceAdmin"): InstanceAdminService(inst),
            service_of(rpb, "Replication"): _ReplicationRouter(inst),
        })
        if writer_address is None:
            await inst.start_writer()
        else:
            await inst.start_replica(writer_address)
        await self.server.set_serving(True)

    def crash(self) -> None:
        if not self.up:
            return
        self.proc.kill()
        if self.server is not None:
            self.cluster.net.unregister(self.server)
        self.inst = self.server = None

    @property
    def role(self) -> str:
        return self.inst.role if self.up and self.inst is not None else "down"


class SimCluster:
    def __init__(self, seed: int, base_dir: str, net: SimNetwork) -> None:
        self.seed = seed
        self.base_dir = base_dir
        self.net = net
        self.nodes = [SimNode(self, n, az) for n, az in NODES]
        self.instances = [SimInstance(self, n, az) for n, az in INSTANCES]
        self.config = ClusterConfig(
            storage_nodes=[NodeInfo(n.name, n.az, n.address) for n in self.nodes],
            volume="main", latency=net.latency)
        self.writer_name = INSTANCES[0][0]
        self.failovers = 0
        #: Writers of clones made by clone episodes (engine/sim/episodes.py): plain
        #: writers of their own volumes, not supervised, as `clone start` runs them.
        self.clones: list[SimInstance] = []

    @staticmethod
    def azs() -> dict[str, str]:
        return dict(NODES + INSTANCES + [CLIENT])

    def node(self, name: str) -> SimNode:
        return next(n for n in self.nodes if n.name == name)

    def instance(self, name: str) -> SimInstance:
        return next(i for i in self.instances if i.name == name)

    @property
    def writer(self) -> SimInstance:
        return self.instance(self.writer_name)

    @property
    def replicas(self) -> list[SimInstance]:
        return [i for i in self.instances if i.name != self.writer_name]

    async def start(self) -> None:
        for n in self.nodes:
            await n.start()
        await self.writer.start(None)
        for r in self.replicas:
            await r.start(self.writer.address)

    async def fail_over(self, ctl: SimTransport) -> bool:
        """The writer is down: promote the live replica (InstanceAdmin.Promote over the
        network, as the control plane does), then bring the old writer back as its replica."""
        old = self.writer
        target = next((r for r in self.replicas if r.up), None)
        if target is None:
            return False
        stub = ctl.channel(target.address, timeout_s=60.0).stub(service_of(dpb, "InstanceAdmin"))
        await stub.Promote(dpb.PromoteRequest())
        self.writer_name = target.name
        self.failovers += 1
        old.crash()
        await old.start(target.address)
        return True

    async def start_clone_writer(self, volume: str, az: str) -> SimInstance:
        """A writer for clone ``volume``, named after it, as `clone start` runs one."""
        inst = SimInstance(self, volume, az, volume=volume)
        self.net.azs[volume] = az
        self.clones.append(inst)
        await inst.start(None)
        return inst

    def close(self) -> None:
        for i in self.clones + self.instances:
            i.crash()
        for n in self.nodes:
            n.crash()
