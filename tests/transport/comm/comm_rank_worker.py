"""The program each rank of a `comm_helpers.Cluster` runs: `python comm_rank_worker.py --rank R ...`.

It builds a Communicator, says it is ready (one JSON line on stdout), then runs scenarios as they are
asked for (one JSON line on stdin each) and answers each with one JSON line: {"ok": true, "result": ...}
or {"ok": false, "error": "Type: message"}. Each scenario checks its own results against a numpy
reference that any rank can compute (inputs derive from the rank and a seed) and returns something
JSON can carry, often a digest so the test can check that every rank got the same bits.

This file holds no tests; its name only keeps it next to the tests it serves. It imports neither
pytest nor torch (the torch scenario imports it when it runs), so ranks start fast.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

import numpy as np


def make_array(rank: int, shape: list[int], dtype: str, seed: int = 0) -> np.ndarray:
    """Rank `rank`'s input: float32 values that bfloat16 holds exactly, or integers; any rank can make it."""
    rng = np.random.default_rng([seed, rank, len(shape), *shape])
    if dtype == "int64":
        return np.asarray(rng.integers(-(10**12), 10**12, size=shape, dtype=np.int64))
    if dtype == "int32":
        return np.asarray(rng.integers(-(10**6), 10**6, size=shape, dtype=np.int32))
    values = np.asarray(rng.standard_normal(size=shape), dtype=np.float32)
    return np.asarray(values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # exact in bfloat16


def digest(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def to_framework(values: np.ndarray, dtype: str) -> Any:
    """bfloat16 arrays come as mlx (cheap to import); everything else as numpy."""
    if dtype != "bfloat16":
        return values
    import mlx.core as mx

    return mx.array(values).astype(mx.bfloat16)


def to_numpy(array: Any) -> np.ndarray:
    if type(array).__module__.startswith("mlx"):
        import mlx.core as mx

        return np.array(array.astype(mx.float32))
    return np.asarray(array)


def scenario_ring_send_recv(comm: Any, rounds: int) -> int:
    right, left = (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size
    for round_index in range(rounds):
        comm.send(
            make_array(comm.rank, [round_index + 3], "float32", seed=round_index), right, tag=round_index
        )
    for round_index in range(rounds):
        got = comm.recv(left, tag=round_index)
        np.testing.assert_array_equal(got, make_array(left, [round_index + 3], "float32", seed=round_index))
    return rounds


def scenario_all_to_all(comm: Any) -> int:
    for dest in range(comm.world_size):  # itself included
        comm.send(make_array(comm.rank, [dest + 1], "int64", seed=dest), dest, tag=comm.rank)
    for source in reversed(range(comm.world_size)):
        got = comm.recv(source, tag=source)
        np.testing.assert_array_equal(got, make_array(source, [comm.rank + 1], "int64", seed=comm.rank))
        assert got.dtype == np.int64
    return comm.world_size


def scenario_recv_times_out(comm: Any, source: int, tag: int, seconds: float) -> Any:
    if comm.rank != 0:
        return None
    started = time.monotonic()
    try:
        comm.recv(source, tag=tag, timeout=seconds)
    except TimeoutError as error:
        return [f"{type(error).__name__}: {error}", time.monotonic() - started]
    raise AssertionError("recv returned without a message")


def scenario_recv_once(comm: Any, source: int, tag: int) -> list[int]:
    return comm.recv(source, tag=tag).tolist()


def scenario_broadcast(comm: Any, root: int, dtype: str, shape: list[int]) -> str:
    expected = make_array(root, shape, dtype, seed=7)
    got = comm.broadcast(expected if comm.rank == root else None, root)
    assert isinstance(got, np.ndarray) and got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    return digest(got)


def reference_all_reduce(inputs: list[np.ndarray], op: str, dtype: str) -> np.ndarray:
    stacked = np.stack(inputs)
    if op == "sum":
        return stacked.sum(axis=0)
    if op == "max":
        return stacked.max(axis=0)
    if op == "min":
        return stacked.min(axis=0)
    if dtype == "int64":
        return stacked.sum(axis=0) // len(inputs)
    return stacked.mean(axis=0, dtype=np.float32)


def scenario_all_reduce(comm: Any, op: str, dtype: str, shape: list[int]) -> str:
    inputs = [make_array(rank, shape, dtype) for rank in range(comm.world_size)]
    array = to_framework(inputs[comm.rank], dtype)
    got = comm.all_reduce(array, op=op)
    assert type(got) is type(array), type(got)
    assert str(got.dtype) == str(array.dtype) and tuple(got.shape) == tuple(shape)
    expected = reference_all_reduce(inputs, op, dtype)
    values = to_numpy(got)
    if dtype == "int64" or op in ("max", "min"):
        np.testing.assert_array_equal(values, expected)
    elif dtype == "bfloat16":  # the float32 result rounded once to bfloat16: within half an ulp (2^-8)
        np.testing.assert_allclose(values, expected, rtol=2**-8, atol=1e-6)
    else:
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    return digest(values)


def scenario_barrier(comm: Any, delay: float) -> list[float]:
    time.sleep(delay * comm.rank)
    arrived = time.time()
    comm.barrier()
    return [arrived, time.time()]


def scenario_interleaved(comm: Any) -> bool:
    """User messages with tags that equal collective numbers, sent around collectives, stay apart."""
    right, left = (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size
    for tag in range(4):
        comm.send(np.full(2, 100 + tag, dtype=np.int64), right, tag=tag)
        total = comm.all_reduce(np.full(3, comm.rank, dtype=np.int64))
        np.testing.assert_array_equal(total, np.full(3, sum(range(comm.world_size))))
        comm.barrier()
    for tag in range(4):
        np.testing.assert_array_equal(comm.recv(left, tag=tag), np.full(2, 100 + tag))
    return True


def scenario_tagged_stream(comm: Any, count: int, tags: int) -> int:
    """Rank 0 sends `count` messages round-robin over `tags` tags; rank 1 takes them tag by tag, last
    tag first, so nearly all of them arrive before their receive is posted."""
    if comm.rank == 0:
        for index in range(count):
            comm.send(np.array([index], dtype=np.int64), 1, tag=index % tags)
        comm.barrier()
        return count
    received = 0
    for tag in reversed(range(tags)):
        for index in range(tag, count, tags):
            got = comm.recv(0, tag=tag)
            assert int(got[0]) == index, f"tag {tag}: expected message {index}, got {int(got[0])}"
            received += 1
    comm.barrier()
    return received


def scenario_large(comm: Any, elements: int) -> str:
    """Each rank sends its large array to the next and checks the previous one's, then all reduce."""
    inputs = [make_array(rank, [elements], "float32") for rank in range(comm.world_size)]
    right, left = (comm.rank + 1) % comm.world_size, (comm.rank - 1) % comm.world_size
    comm.send(inputs[comm.rank], right, tag=5)
    np.testing.assert_array_equal(comm.recv(left, tag=5), inputs[left])
    got = comm.all_reduce(inputs[comm.rank])
    np.testing.assert_allclose(got, np.sum(inputs, axis=0), rtol=1e-5, atol=1e-5)
    return digest(got)


def scenario_torch_frameworks(comm: Any) -> bool:
    import torch

    values = torch.from_numpy(make_array(comm.rank, [5, 7], "float32"))
    total = comm.all_reduce(values.to(torch.bfloat16), op="sum")
    assert isinstance(total, torch.Tensor) and total.dtype == torch.bfloat16 and total.shape == (5, 7)
    inputs = [make_array(rank, [5, 7], "float32") for rank in range(comm.world_size)]
    expected = torch.from_numpy(np.sum(inputs, axis=0, dtype=np.float32)).to(torch.bfloat16)
    assert torch.equal(total, expected)  # float32 sum of two, rounded once: what torch itself gives
    peer = 1 - comm.rank
    comm.send(torch.arange(6, dtype=torch.int32).reshape(2, 3) * (comm.rank + 1), peer)
    got = comm.recv(peer, like="torch")
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int32
    assert torch.equal(got, torch.arange(6, dtype=torch.int32).reshape(2, 3) * (peer + 1))
    root_value = torch.linspace(-1, 1, 9, dtype=torch.bfloat16)
    shared = comm.broadcast(root_value if comm.rank == 0 else None, 0, like="torch")
    assert shared.dtype == torch.bfloat16 and torch.equal(shared, root_value)
    as_numpy = comm.broadcast(root_value if comm.rank == 0 else None, 0)
    if comm.rank == 1:  # numpy has no bfloat16: the exact float32 values
        assert as_numpy.dtype == np.float32 and np.array_equal(as_numpy, root_value.float().numpy())
    return True


def scenario_all_reduce_until_failure(comm: Any, elements: int) -> int:
    array = np.ones(elements, dtype=np.float32)
    for _ in range(100_000):
        comm.all_reduce(array)
    return 100_000


def scenario_close(comm: Any, timeout: float) -> float:
    """Close the communicator (the rank then answers nothing more but this); the seconds it took."""
    started = time.monotonic()
    comm.close(timeout=timeout)
    return time.monotonic() - started


SCENARIOS = {
    name.removeprefix("scenario_"): value for name, value in globals().items() if name.startswith("scenario_")
}


def rank_main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--addresses", required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--ring-threshold", type=int, required=True)
    parser.add_argument("--token")
    parser.add_argument("--tls-ca")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    args = parser.parse_args()
    from meshllm.transport.comm import Communicator
    from meshllm.transport.tls import TlsFiles

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    addresses = args.addresses.split(",")
    try:
        comm = Communicator(
            args.rank, len(addresses), addresses, token=args.token, timeout=args.timeout,
            ring_threshold=args.ring_threshold,
            tls=TlsFiles.from_options(args.tls_ca, args.tls_cert, args.tls_key),
        )  # fmt: skip
    except Exception as error:
        reply({"ok": False, "error": f"{type(error).__name__}: {error}"})
        return 1
    reply({"ok": True})
    with comm:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                result = SCENARIOS[request["scenario"]](comm, **request["args"])
                reply({"ok": True, "result": result})
            except Exception as error:
                reply({"ok": False, "error": f"{type(error).__name__}: {error}"})
    return 0


if __name__ == "__main__":
    sys.exit(rank_main())
