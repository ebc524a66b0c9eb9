"""`meshllm serve`'s weights options: who takes weights from the cluster, where, and bad values named."""

from __future__ import annotations

import argparse

import pytest

from meshllm.cli.serve import add_arguments, parse_device_models, weights_addresses
from meshllm.errors import ConfigError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_given_workers_take_weights_from_the_api_port_plus_one_by_default() -> None:
    assert weights_addresses(parse("--port", "9000"), has_workers=True, local_workers=False) == (
        "127.0.0.1:9001",
        "127.0.0.1:9001",
    )


def test_local_workers_read_the_model_themselves_unless_asked() -> None:
    assert weights_addresses(parse(), has_workers=True, local_workers=True) == (None, None)
    listen, dialled = weights_addresses(parse("--weights", "cluster"), has_workers=True, local_workers=True)
    assert listen == dialled == "127.0.0.1:8101"
    assert weights_addresses(parse("--weights", "own"), has_workers=True, local_workers=False) == (None, None)


def test_on_every_interface_the_workers_dial_the_given_address() -> None:
    args = parse("--host", "0.0.0.0", "--weights-port", "7000", "--weights-address", "mini1.local:7000")
    assert weights_addresses(args, has_workers=True, local_workers=False) == (
        "0.0.0.0:7000",
        "mini1.local:7000",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("--weights-port", "70000"),
            "--weights-port must be a port (1 to 65535) other than the API's, got 70000",
        ),
        (("--port", "9000", "--weights-port", "9000"), "other than the API's, got 9000"),
        (("--weights-address", "mini1"), "--weights-address: 'mini1' is not HOST:PORT"),
    ],
)
def test_bad_weights_options_are_named(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        weights_addresses(parse(*argv), has_workers=True, local_workers=False)


def test_device_models_are_name_path_pairs() -> None:
    assert parse_device_models("w1=/models/q, w2=org/name") == {"w1": "/models/q", "w2": "org/name"}
    with pytest.raises(ConfigError, match=r"--device-model: 'w1' is not NAME=PATH"):
        parse_device_models("w1")
