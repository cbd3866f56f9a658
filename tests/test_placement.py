"""Unit tests of engine/format/placement.py: PG memberships, their JSON, and the placement
function (two nodes per AZ, least-loaded first, deterministic ties). No I/O."""

from __future__ import annotations

import json

import pytest

from engine.format.placement import (
    Placement,
    PgMembership,
    fleet_nodes,
    natural_key,
    pick_replacement,
    place_pg,
)
from engine.format.volume import AZS


def _place_many(n_nodes: int, n_pgs: int) -> Placement:
    nodes = dict(fleet_nodes(n_nodes))
    placement = Placement()
    for pg in range(n_pgs):
        placement.put("main", place_pg(pg, nodes, placement.segment_counts(nodes)))
    return placement


def test_fleet_nodes_keep_the_six_node_names_and_azs():
    assert fleet_nodes(6) == [("sn1", "az-a"), ("sn2", "az-a"), ("sn3", "az-b"),
                              ("sn4", "az-b"), ("sn5", "az-c"), ("sn6", "az-c")]
    nine = dict(fleet_nodes(9))
    assert [nine[f"sn{i}"] for i in range(1, 10)] == ["az-a"] * 3 + ["az-b"] * 3 + ["az-c"] * 3
    for bad in (0, 3, 5, 7, 8, 10):
        with pytest.raises(ValueError, match="multiple of 3"):
            fleet_nodes(bad)


def test_six_nodes_place_every_pg_on_all_six():
    placement = _place_many(6, 8)
    for pg, m in placement.pgs("main").items():
        assert m.members == ("sn1", "sn2", "sn3", "sn4", "sn5", "sn6") and m.epoch == 1


@pytest.mark.parametrize("n_nodes", [9, 12, 15])
def test_placement_is_two_per_az_and_balanced(n_nodes):
    nodes = dict(fleet_nodes(n_nodes))
    n_pgs = 4 * n_nodes
    placement = _place_many(n_nodes, n_pgs)
    for m in placement.pgs("main").values():
        m.check_azs(nodes)
    counts = placement.segment_counts(nodes)
    assert sum(counts.values()) == 6 * n_pgs
    # Least-loaded first: no node holds more than one segment above another of its AZ.
    for az in AZS:
        in_az = [counts[n] for n in nodes if nodes[n] == az]
        assert max(in_az) - min(in_az) <= 1, (az, counts)
    # Different PGs really use different node sets.
    assert len({m.members for m in placement.pgs("main").values()}) > 1


def test_placement_is_deterministic_with_natural_name_order():
    nodes = dict(fleet_nodes(12))
    first = place_pg(0, nodes, {})
    assert first.members == ("sn1", "sn2", "sn5", "sn6", "sn9", "sn10")
    assert place_pg(0, nodes, {}) == first
    assert sorted(["sn10", "sn2", "sn1"], key=natural_key) == ["sn1", "sn2", "sn10"]
    # Loaded nodes are avoided; excluded ones never picked.
    loaded = place_pg(1, nodes, {"sn1": 5, "sn2": 5}, exclude=["sn5"])
    assert loaded.members[:2] == ("sn3", "sn4") and "sn5" not in loaded.members


def test_too_few_nodes_in_an_az_is_a_clear_error():
    nodes = dict(fleet_nodes(6))
    with pytest.raises(ValueError, match="az-b has 1 usable nodes"):
        place_pg(0, nodes, {}, exclude=["sn3"])


def test_json_round_trip_and_bad_input():
    placement = _place_many(9, 5)
    text = json.dumps(placement.to_json())
    assert Placement.from_json(json.loads(text)) == placement
    assert Placement.from_json(None) == Placement()
    with pytest.raises(ValueError, match="6 distinct"):
        PgMembership(0, 1, ("sn1",) * 6)
    with pytest.raises(ValueError, match="membership epoch"):
        PgMembership(0, 0, tuple(f"sn{i}" for i in range(1, 7)))
    with pytest.raises(ValueError, match="not a PG membership"):
        PgMembership.from_json({"pg": 0})
    m = placement.get("main", 0)
    with pytest.raises(ValueError, match="older"):
        placement.put("main", PgMembership(0, 1, m.members)) or placement.put(
            "main", PgMembership(0, 2, m.members)) or placement.put("main", m)


def test_pgs_on_and_replacement():
    nodes = dict(fleet_nodes(9))
    placement = _place_many(9, 3)
    m0 = placement.get("main", 0)
    assert all(0 in placement.pgs_on("main", n) for n in m0.members)
    spare = pick_replacement(m0, m0.members[0], nodes, placement.segment_counts(nodes))
    assert spare is not None and spare not in m0.members and nodes[spare] == nodes[m0.members[0]]
    six = dict(fleet_nodes(6))
    full = place_pg(0, six, {})
    assert pick_replacement(full, "sn1", six, {}) is None
    with pytest.raises(KeyError, match="not placed"):
        placement.members("main", 99)
