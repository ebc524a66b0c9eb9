"""The threads `cluster start` gives each device: its share of the machine's cores, and every core for a
step alone in the pipeline where devices share the machine."""

from __future__ import annotations

from cluster_helpers import free_port

from meshllm.cluster.checks import compute_env, threads_alone_for, threads_for
from meshllm.config import Cluster, Device, load_cluster
from meshllm.defaults import SHARED_CORES_ENV


def one_machine(cluster_files) -> tuple[Cluster, dict[str, Device]]:
    """A coordinator and two workers on one machine, w2 with threads of its own."""
    path = cluster_files.write(
        [
            {"name": "coordinator", "host": "127.0.0.1"},
            {"name": "w1", "host": "127.0.0.1", "port": free_port()},
            {"name": "w2", "host": "127.0.0.1", "port": free_port(), "threads": 1},
        ]
    )
    cluster = load_cluster(path)
    return cluster, {device.name: device for device in cluster.device}


def test_devices_sharing_a_machine_split_its_cores_and_take_them_all_for_a_step_alone(cluster_files) -> None:
    cluster, devices = one_machine(cluster_files)
    assert threads_for(cluster, devices["w1"], 8) == 2
    assert threads_alone_for(cluster, devices["w1"], 8) == 8
    assert threads_alone_for(cluster, devices["coordinator"], 8) == 8
    assert threads_alone_for(cluster, devices["w2"], 8) is None  # the threads it was given win
    assert threads_alone_for(cluster, devices["w1"], 1) is None  # one core: nothing to take


def test_devices_sharing_a_machine_compute_with_idle_threads_that_give_the_cores_back(cluster_files) -> None:
    cluster, devices = one_machine(cluster_files)
    assert compute_env(cluster, devices["w1"], 8) == {"OMP_NUM_THREADS": "2", **SHARED_CORES_ENV}
    assert compute_env(cluster, devices["w2"], 8) == {"OMP_NUM_THREADS": "1"}  # never takes every core
    assert compute_env(cluster, devices["w1"], 1) == {"OMP_NUM_THREADS": "1"}


def test_a_device_on_cores_of_its_own_computes_on_them_and_leaves_the_rest_to_the_others(
    cluster_files,
) -> None:
    path = cluster_files.write(
        [
            {"name": "coordinator", "host": "127.0.0.1"},
            {"name": "w1", "host": "127.0.0.1", "port": free_port()},
            {"name": "w2", "host": "127.0.0.1", "port": free_port(), "cores": "4-7"},
        ]
    )
    cluster = load_cluster(path)
    devices = {device.name: device for device in cluster.device}
    assert threads_for(cluster, devices["w2"], 8) == 4  # its own cores
    assert threads_alone_for(cluster, devices["w2"], 8) is None
    assert threads_for(cluster, devices["w1"], 8) == 4  # the machine's split between the two sharing it
    assert threads_alone_for(cluster, devices["w1"], 8) == 8
