"""launcher.distributed's environment decisions, with injected device counts and routing answers: the CUDA ordinal
DeepSpeed binds under per-task GPU binding, the socket interface across nodes, the rank-0 group's timeouts."""
import os
import socket
from datetime import timedelta

import pytest
import torch

from launcher import distributed
from launcher.net import DEFAULT_ROUTE_PROBE, interface_addresses, interface_for, route_source, socket_ifnames


@pytest.mark.parametrize("local_rank, count, expected", [
    ("3", 1, "0"),   # srun --gpus-per-task=1: every task sees its own GPU as device 0
    ("5", 2, "1"),   # two GPUs per task
    ("3", 8, "3"),   # all eight visible: the local rank is the ordinal
    ("3", 0, "3"),   # no GPU: nothing to bind
])
def test_deepspeed_sees_the_visible_ordinal(local_rank, count, expected):
    env = {"LOCAL_RANK": local_rank}
    assert distributed.bind_device_ordinal(env, count) == int(local_rank)  # the launcher's value, for logs
    assert env["LOCAL_RANK"] == expected


def test_open_mpi_local_rank_follows_because_deepspeed_asserts_they_agree():
    env = {"LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    distributed.bind_device_ordinal(env, 1)
    assert env == {"LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}


NODE = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.0.0.5"], "ib0": ["192.168.7.5"]}


def routes(table):
    return lambda host: table.get(host)


def test_interface_is_the_one_holding_the_route_source():
    assert interface_for("10.0.0.1", routes({"10.0.0.1": "10.0.0.5"}), NODE) == "eth0"
    assert interface_for("192.168.7.1", routes({"192.168.7.1": "192.168.7.5"}), NODE) == "ib0"


def test_master_name_resolving_to_loopback_on_its_own_node_takes_the_default_route():
    """Debian's /etc/hosts: the master's name is 127.0.1.1 on the master itself; gloo must not advertise it."""
    table = {"node0": "127.0.0.1", DEFAULT_ROUTE_PROBE: "10.0.0.5"}
    assert interface_for("node0", routes(table), NODE) == "eth0"


def test_no_usable_route_gives_no_interface():
    assert interface_for("node0", routes({}), NODE) is None
    assert interface_for("node0", routes({"node0": "127.0.0.1", DEFAULT_ROUTE_PROBE: "127.0.0.1"}), NODE) is None
    assert interface_for("10.9.9.9", routes({"10.9.9.9": "10.9.9.8"}), NODE) is None  # no interface holds it


def test_user_settings_win_and_only_missing_ones_are_filled():
    route, nodes = routes({"10.0.0.1": "10.0.0.5"}), lambda: NODE
    assert socket_ifnames({}, "10.0.0.1", route, nodes) == {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert socket_ifnames({"NCCL_SOCKET_IFNAME": "ib0"}, "10.0.0.1", route, nodes) == {"GLOO_SOCKET_IFNAME": "eth0"}
    assert socket_ifnames({"NCCL_SOCKET_IFNAME": "ib0", "GLOO_SOCKET_IFNAME": "ib0"}, "10.0.0.1", route, nodes) == {}


def test_only_a_multi_node_job_sets_the_interface():
    choose = lambda env, addr: {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}  # noqa: E731
    env = {"MASTER_ADDR": "node0"}
    distributed.set_socket_ifnames(env, distributed.LaunchEnv("slurm", one_node=True), choose)
    assert env == {"MASTER_ADDR": "node0"}
    distributed.set_socket_ifnames(env, distributed.LaunchEnv("slurm", one_node=False), choose)
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth0"


def test_real_routing_on_loopback():
    assert route_source("127.0.0.1") == "127.0.0.1"
    found = interface_addresses()
    assert "127.0.0.1" in found["lo"]
    assert interface_for("127.0.0.1", lambda host: "127.0.0.1" if host == "127.0.0.1" else None, found) is None
    mine = next((a for name, addrs in found.items() if name != "lo" for a in addrs if "." in a), None)
    if mine is not None:  # a host with a real interface: the route to its own address leaves from that interface
        assert interface_for(mine, route_source, found) == next(n for n, a in found.items() if mine in a)


@pytest.mark.parametrize("extra, one_node", [({"CROSS_SIZE": "2"}, False), ({"CROSS_SIZE": "1"}, True),
                                             ({"LOCAL_WORLD_SIZE": "2"}, False), ({"LOCAL_WORLD_SIZE": "4"}, True),
                                             ({"MASTER_ADDR": "gpu03"}, False), ({}, True)])
def test_deepspeed_or_torchrun_launch_knows_when_it_spans_nodes(monkeypatch, extra, one_node):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_")) or k in ("CROSS_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            monkeypatch.delenv(k)
    for k, v in dict(RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_PORT="29500", **extra).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", extra.get("MASTER_ADDR", "127.0.0.1"))
    assert distributed.map_launcher_env() == distributed.LaunchEnv("launcher", one_node)


def test_rank0_group_connects_under_a_short_timeout_and_waits_under_the_long_one(monkeypatch):
    """A real one-rank gloo group: created with RANK0_GROUP_CONNECT, then operating under the rank-0 timeout."""
    created = []
    real_new_group = torch.distributed.new_group
    monkeypatch.setattr(torch.distributed, "new_group",
                        lambda **kw: created.append(kw["timeout"]) or real_new_group(**kw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        distributed.create_rank0_group(timedelta(hours=6))
        group = distributed._rank0_group
        assert created == [distributed.RANK0_GROUP_CONNECT] and distributed.RANK0_GROUP_CONNECT < timedelta(hours=6)
        assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(hours=6)
    finally:
        distributed.close()
