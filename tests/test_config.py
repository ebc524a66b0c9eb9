"""The cluster file: defaults that depend on other entries, and errors that name the device and the field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshllm import defaults
from meshllm.config import ClusterSettings, Device, load_cluster
from meshllm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cluster.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = """
[cluster]
model = "demo"

[[device]]
name = "head"

[[device]]
name = "w1"

[[device]]
name = "w2"
"""


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_cluster(write(tmp_path, text))
    return str(caught.value)


def test_defaults_make_the_first_device_coordinator_and_number_worker_ports_per_host(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, MINIMAL))
    assert [device.role for device in cluster.device] == ["coordinator", "worker", "worker"]
    assert [device.port for device in cluster.device] == [None, 50051, 50052]
    assert cluster.name == "cluster"  # the file's stem
    assert cluster.cluster.api_port == 8100
    assert cluster.cluster.state_dir == tmp_path / ".meshllm" / "cluster"
    assert cluster.api_url == "http://127.0.0.1:8100"
    head = cluster.coordinator
    assert (head.host, head.python, head.workdir) == ("127.0.0.1", sys.executable, str(tmp_path))


def test_defaults_and_choices_are_the_shared_vocabulary(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, MINIMAL))
    assert cluster.cluster.api_port == defaults.DEFAULT_API_PORT
    assert cluster.workers[0].port == defaults.DEFAULT_STAGE_PORT
    engines = ", ".join(map(repr, defaults.ENGINES))
    dtypes = ", ".join(map(repr, (defaults.AUTO_DTYPE, *defaults.DTYPES)))
    assert f"engine must be one of {engines}" in error_of(tmp_path, MINIMAL + 'engine = "tf"\n')
    assert f"dtype must be one of {dtypes}" in error_of(
        tmp_path, MINIMAL.replace('model = "demo"', 'model = "demo"\ndtype = "int4"')
    )
    coordinator_name = MINIMAL.replace('name = "w1"', f"name = {defaults.COORDINATOR_STAGE!r}")
    assert "that name is the coordinator's own stage" in error_of(tmp_path, coordinator_name)


def test_ports_count_up_separately_on_each_host_and_skip_given_ones(tmp_path: Path) -> None:
    text = MINIMAL.replace('name = "w1"', 'name = "w1"\nhost = "10.0.0.2"').replace(
        'name = "w2"', 'name = "w2"\nport = 50051'
    )
    text += '\n[[device]]\nname = "w3"\n'
    ports = {device.name: device.port for device in load_cluster(write(tmp_path, text)).workers}
    assert ports == {"w1": 50051, "w2": 50051, "w3": 50052}


def test_an_ssh_device_defaults_to_its_target_host_python3_and_the_home_folder(tmp_path: Path) -> None:
    text = MINIMAL.replace('name = "w1"', 'name = "w1"\nssh = "me@mini2.local"')
    worker = load_cluster(write(tmp_path, text)).get("w1")
    assert (worker.host, worker.python, worker.workdir) == ("mini2.local", "python3", "~")
    assert worker.listen_host == "0.0.0.0"  # not a loopback host: listen on every interface


def test_a_given_coordinator_role_wins_over_the_first_device(tmp_path: Path) -> None:
    text = MINIMAL.replace('name = "w2"', 'name = "w2"\nrole = "coordinator"')
    cluster = load_cluster(write(tmp_path, text))
    assert cluster.coordinator.name == "w2"
    assert [worker.name for worker in cluster.workers] == ["head", "w1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('name = "w1"', 'name = "mini2"\nport = "abc"'),
            "cluster.toml: device 'mini2': port must be an integer between 1 and 65535, got 'abc'",
        ),
        (
            ('name = "w1"', 'name = "w1"\nport = 70000'),
            "device 'w1': port must be an integer between 1 and 65535",
        ),
        (('name = "w1"', 'name = "w1"\nprot = 5'), "device 'w1': unknown key 'prot' (did you mean 'port'?)"),
        (
            ('name = "w1"', 'name = "w1"\nrole = "boss"'),
            "device 'w1': role must be one of 'coordinator', 'worker'",
        ),
        (('name = "w1"', 'name = "w1"\nmemory = -2'), "device 'w1': memory must be a number greater than 0"),
        (
            ('name = "w1"', 'name = "w1"\nthreads = 0'),
            "device 'w1': threads must be an integer of at least 1",
        ),
        (('name = "w1"', 'name = "w 1"'), "device 'w 1': name must be letters, digits"),
        (('name = "w1"', 'name = "w1"\nengine = "tf"'), "device 'w1': engine must be one of 'torch', 'mlx'"),
        (('name = "w1"', 'name = "w1"\nenv = 3'), "device 'w1': env must be a table of NAME = \"value\""),
        (
            ('model = "demo"', 'model = "demo"\ndtype = "int4"'),
            "[cluster]: dtype must be one of 'auto', 'float32'",
        ),
        (
            ('model = "demo"', 'model = "demo"\napi_port = 0'),
            "[cluster]: api_port must be an integer between",
        ),
        (('model = "demo"', 'modle = "demo"'), "[cluster]: unknown key 'modle' (did you mean 'model'?)"),
        (
            ('model = "demo"', 'model = "demo"\nreplan_after = -1'),
            "[cluster]: replan_after must be a number of at least 0, got -1",
        ),
        (('model = "demo"', 'name = "x"'), "[cluster]: model is required"),
        (('name = "w1"', 'name = "head"'), "two devices are named 'head'"),
        (
            ('"w2"', '"w2"\nport = 50051\n[[device]]\nname = "w3"\nport = 50051'),
            "devices 'w2' and 'w3' both use port",
        ),
        (
            ('"w2"', '"w2"\nrole = "coordinator"\n[[device]]\nname = "w3"\nrole = "coordinator"'),
            "found 2 ('w2', 'w3')",
        ),
        (('name = "head"', 'name = "head"\nport = 9000'), "device 'head': port is for workers"),
        (('name = "head"', 'name = "head"\nstep_port = 9000'), "device 'head': step_port is for workers"),
        (('name = "w1"', 'name = "coordinator"'), "that name is the coordinator's own stage"),
        (
            ('model = "demo"', 'model = "demo"\ntoken = "a"\ntoken_file = "t"'),
            "give token or token_file, not both",
        ),
        (
            ('name = "head"', 'name = "head"\nmodel_path = "/models/x"'),
            "device 'head': model_path is for workers; the coordinator reads [cluster] model",
        ),
        (
            ('model = "demo"', 'model = "demo"\napi_port = 9000\nweights_port = 50051'),
            "the coordinator serves weights on port 50051, which device 'w1' uses on 127.0.0.1",
        ),
    ],
)
def test_errors_name_the_device_and_the_field(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    assert message in error_of(tmp_path, MINIMAL.replace(*change, 1))


def test_a_file_without_devices_or_cluster_table_says_what_is_missing(tmp_path: Path) -> None:
    assert "no [[device]] tables" in error_of(tmp_path, '[cluster]\nmodel = "demo"\n')
    assert "a [cluster] table is required" in error_of(tmp_path, '[[device]]\nname = "a"\n')
    assert "(note the double brackets)" in error_of(
        tmp_path, '[cluster]\nmodel = "demo"\n[device]\nname = "a"\n'
    )


def test_invalid_toml_and_a_missing_file_are_one_line_errors(tmp_path: Path) -> None:
    assert "not valid TOML" in error_of(tmp_path, "[cluster\n")
    with pytest.raises(ConfigError, match="no such cluster file"):
        load_cluster(tmp_path / "absent.toml")


def test_the_command_prints_the_error_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('name = "w1"', 'name = "mini2"\nport = "abc"'))
    result = subprocess.run(
        [sys.executable, "-m", "meshllm", "cluster", "status", "-c", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert re.fullmatch(
        r"error: \S*cluster.toml: device 'mini2': port must be an integer between 1 and 65535, got 'abc'\n",
        result.stderr,
    )


def test_the_local_example_is_a_coordinator_and_two_workers_on_this_machine() -> None:
    cluster = load_cluster(ROOT / "examples" / "local.toml")
    assert cluster.cluster.model == "demo"
    assert [device.role for device in cluster.device] == ["coordinator", "worker", "worker"]
    assert {device.host for device in cluster.device} == {"127.0.0.1"}
    assert not any(device.is_remote for device in cluster.device)


def test_the_two_macs_example_reaches_mini2_over_ssh_with_its_virtualenv() -> None:
    cluster = load_cluster(ROOT / "examples" / "two-macs.toml")
    assert cluster.coordinator.name == "mini1"
    mini2 = cluster.get("mini2")
    assert (mini2.ssh, mini2.role, mini2.port) == ("mini2.local", "worker", 50051)
    assert mini2.python.endswith("/.venv/bin/python")
    assert cluster.api_url == "http://mini1.local:8100"


def test_docs_describe_every_key() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for key in [*ClusterSettings.model_fields, *Device.model_fields]:
        assert f"`{key}`" in doc, f"docs/configuration.md does not describe `{key}`"


@pytest.mark.parametrize(
    ("value", "flag"), [("0", ["--replan-after", "0"]), ("7.5", ["--replan-after", "7.5"])]
)
def test_replan_after_reaches_the_coordinator_s_command_line(
    tmp_path: Path, value: str, flag: list[str]
) -> None:
    from meshllm.cluster.start import Starter

    path = tmp_path / "cluster.toml"
    path.write_text(
        f'[cluster]\nmodel = "demo"\nreplan_after = {value}\n'
        '[[device]]\nname = "head"\nhost = "127.0.0.1"\n[[device]]\nname = "w1"\nhost = "127.0.0.1"\n'
    )
    cluster = load_cluster(path)
    argv = Starter(cluster, force=False, timeout=10).coordinator_argv(cluster.device[0])
    at = argv.index("--replan-after")
    assert argv[at : at + 2] == flag


def test_workers_take_weights_from_the_coordinator_unless_they_have_a_model_path(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, MINIMAL.replace('name = "w2"', 'name = "w2"\nmodel_path = "m"')))
    assert [device.model_path for device in cluster.workers] == [None, "m"]
    assert cluster.takes_weights and cluster.weights_port == cluster.cluster.api_port + 1
    every = MINIMAL.replace('name = "w1"', 'name = "w1"\nmodel_path = "m"').replace(
        'name = "w2"', 'name = "w2"\nmodel_path = "m"'
    )
    assert not load_cluster(write(tmp_path, every, "every.toml")).takes_weights


def test_a_device_s_cores_reach_its_command_line_and_a_bad_list_is_named(tmp_path: Path) -> None:
    from meshllm.cluster.start import Starter

    text = MINIMAL.replace('name = "head"', 'name = "head"\ncores = "0-1"').replace(
        'name = "w1"', 'name = "w1"\ncores = 2'
    )
    cluster = load_cluster(write(tmp_path, text))
    starter = Starter(cluster, force=False, timeout=10)
    head = starter.coordinator_argv(cluster.device[0])
    assert head[head.index("--cores") + 1] == "0-1"
    worker = starter.worker_argv(cluster.device[1], threads=1)
    assert worker[worker.index("--cores") + 1] == "2"
    assert "--cores" not in starter.worker_argv(cluster.device[2], threads=1)
    assert "--shared-stages" not in head
    with_turns = text.replace('model = "demo"', 'model = "demo"\nshared_stages = "turns"')
    turns = load_cluster(write(tmp_path, with_turns, "turns.toml"))
    head = Starter(turns, force=False, timeout=10).coordinator_argv(turns.device[0])
    assert head[head.index("--shared-stages") + 1] == "turns"
    message = error_of(
        tmp_path, text.replace('model = "demo"', 'model = "demo"\nshared_stages = "alternate"')
    )
    assert "shared_stages" in message and "'alternate'" in message
    message = error_of(tmp_path, MINIMAL.replace('name = "w1"', 'name = "w1"\ncores = "3-1"'))
    assert "cores" in message and "'3-1'" in message and "not a range of cores" in message
