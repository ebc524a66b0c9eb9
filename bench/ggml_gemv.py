"""ggml through its Python bindings (`ggml-python`) against llama.cpp, on the weights a decode token reads.

The question this answers: is ggml driven from Python as fast per token as llama.cpp on the same CPU, so
that a meshllm engine built on it could reach llama.cpp's decode speed? Each measured "token" is one
compute of one ggml graph holding the decode mat-vec products of the Qwen3-0.6B shape: for each of the 28
layers q 2048×1024, k and v 1024×1024, o 1024×2048, gate and up 3072×1024, down 1024×3072, then the lm_head
151936×1024 (tied: the embedding matrix). Every matrix is a distinct tensor, read from the same GGUF file
llama-bench reads (bf16 from bench/make_gguf.py, q8_0 and q4_0 from llama-quantize, which keeps the tied
embedding in q6_K for q4_0), so both read the same bytes in the same ggml types. The graph chains the
products as a decode step does (h → q, k, v → o(q) + k + v → rms_norm → gate, up → down(silu(gate)·up) →
rms_norm → next layer; logits from the last), is built and allocated once and computed again for every
token; each token also writes the input vector and reads the 151936 logits back, as a stage would.

Weights go where llama.cpp would put them: each tensor into the first of the CPU backend's extra buffer
types (AMX, then the repacking one: interleaved layouts for q4_0 / q4_K / q8_0 on this ISA) whose
supports_op accepts its mat-vec, else a plain CPU buffer; the tied embedding stays in a plain buffer, as in
llama.cpp, where it is also the input lookup (get_rows, which no extra buffer type takes). --no-extra puts
every weight of the ggml graph in a plain buffer (llama-bench has no such switch: it keeps its placement).

Against it: `llama-bench -p 0 -n 64 -r 1 -t T` on the same GGUF (tg only; its graph also has attention,
norms, RoPE and the KV cache, which cost little at this length). Rounds interleave the two per type and
thread count, so load from other work on the machine falls on both alike; the figures are the median and
range over the rounds, and the ratio is llama.cpp's per-token time over ggml's (≥ 1 when ggml is faster).

Run it where ggml-python is installed (the project's dev extra, or a venv of its own):

    .venv/bin/python bench/ggml_gemv.py --llamacpp ~/.cache/llama.cpp [--types bf16,q8_0,q4_0]
        [--threads 1,2] [--rounds 3] [--tokens 64] [--no-extra] [--no-amx] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import (
    gguf_file,
    llamacpp_binary,
    machine_load,
    shape_checkpoint,
    show,
    spread,
)

LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RMS_EPS = 1e-6
LOG_WARN = 3  # ggml's GGML_LOG_LEVEL_WARN: below it (the repacking buffers' per-tensor notes) is dropped
_log_callback: Any = None  # kept referenced while ggml may call it


def ggml_module() -> Any:
    global _log_callback
    try:
        import ggml  # type: ignore[import-not-found]
    except ImportError as error:
        raise SystemExit(f"ggml-python is not installed here ({error}): pip install ggml-python") from error
    if _log_callback is None:

        def log(level: int, text: bytes | None, _user: Any) -> None:
            if level >= LOG_WARN and text:
                sys.stderr.write(text.decode(errors="replace"))

        _log_callback = ggml.ggml_log_callback(log)
        ggml.ggml_log_set(_log_callback, None)
    return ggml


def llamacpp_commit(llamacpp: Path) -> str:
    """The commit of a llama.cpp tree: a git checkout's HEAD, or the COMMIT file of an exported tree."""
    recorded = llamacpp / "COMMIT"
    if recorded.exists():
        return recorded.read_text().strip()[:9]
    command = ["git", "-C", str(llamacpp), "log", "-1", "--format=%h"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class Weight:
    name: str
    ggml_type: int
    ne0: int  # input features
    ne1: int  # output features
    data: np.ndarray  # the GGUF's bytes of this tensor, as stored


def gguf_weights(path: Path) -> tuple[list[Weight], Weight]:
    """The layers' decode matrices in order, and the lm_head (output.weight, or the tied embedding)."""
    from gguf import GGUFReader

    tensors = {tensor.name: tensor for tensor in GGUFReader(str(path)).tensors}

    def weight(name: str) -> Weight:
        tensor = tensors[name]
        ne0, ne1 = (int(n) for n in tensor.shape[:2])
        data = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1)
        return Weight(name, int(tensor.tensor_type), ne0, ne1, data)

    blocks = 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("blk."))
    layers = [weight(f"blk.{i}.{matrix}.weight") for i in range(blocks) for matrix in LAYER_MATRICES]
    head = weight("output.weight" if "output.weight" in tensors else "token_embd.weight")
    return layers, head


class GemvGraph:
    """The decode mat-vecs of one GGUF as one ggml graph on the CPU backend, built and allocated once."""

    def __init__(self, layers: list[Weight], head: Weight, use_extra: bool, use_amx: bool = True) -> None:
        g = ggml_module()
        self.g = g
        self.backend = g.ggml_backend_cpu_init()
        self.device = g.ggml_backend_get_device(self.backend)
        self.placement: dict[str, int] = {}  # buffer type name -> tensors placed in it
        weights = [*layers, head]

        # Weight tensors, each in a context of its buffer type.
        overhead = g.ggml_tensor_overhead()
        self.weight_ctx = g.ggml_init(
            g.ggml_init_params(mem_size=overhead * (len(weights) + 8), mem_buffer=None, no_alloc=True)
        )
        tensors = []
        for weight in weights:
            tensor = g.ggml_new_tensor_2d(self.weight_ctx, weight.ggml_type, weight.ne0, weight.ne1)
            g.ggml_set_name(tensor, weight.name.encode())
            if g.ggml_nbytes(tensor) != weight.data.nbytes:
                raise SystemExit(f"{weight.name}: {weight.data.nbytes} bytes in the GGUF, ggml expects more")
            tensors.append(tensor)

        extra = self.extra_buffer_types() if use_extra else []
        if not use_amx:
            extra = [b for b in extra if g.ggml_backend_buft_name(b) != b"AMX"]
        # the backend's own buffer type, not ggml_backend_cpu_buffer_type(): the bindings declare that
        # one's result as a C int, which cuts the pointer to 32 bits
        plain = g.ggml_backend_get_default_buffer_type(self.backend)
        chosen = []
        for weight, tensor in zip(weights, tensors, strict=True):
            tied = weight is head and weight.name == "token_embd.weight"
            buft = plain if tied else next((b for b in extra if self.supports(b, tensor)), plain)
            chosen.append(buft)
        self.buffers = []
        for buft in {id(b): b for b in chosen}.values():
            # one context per buffer type: ggml allocates a context's tensors in one buffer
            members = [i for i, b in enumerate(chosen) if b == buft]
            ctx = g.ggml_init(
                g.ggml_init_params(mem_size=overhead * (len(members) + 8), mem_buffer=None, no_alloc=True)
            )
            placed = []
            for i in members:
                copy = g.ggml_dup_tensor(ctx, tensors[i])
                g.ggml_set_name(copy, weights[i].name.encode())
                placed.append((i, copy))
            buffer = g.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
            if not buffer:
                raise SystemExit(f"could not allocate weights in {g.ggml_backend_buft_name(buft).decode()}")
            g.ggml_backend_buffer_set_usage(buffer, g.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
            for i, copy in placed:
                data = weights[i].data
                g.ggml_backend_tensor_set(copy, data.ctypes.data_as(ctypes.c_void_p), 0, data.nbytes)
                tensors[i] = copy
            self.buffers.append((ctx, buffer))
            self.placement[g.ggml_backend_buft_name(buft).decode()] = len(members)

        # The graph: a decode step's chain of mat-vecs.
        self.graph_ctx = g.ggml_init(
            g.ggml_init_params(
                mem_size=overhead * 4096 + g.ggml_graph_overhead(), mem_buffer=None, no_alloc=True
            )
        )
        ctx = self.graph_ctx
        hidden = layers[0].ne0
        self.x = g.ggml_new_tensor_1d(ctx, g.GGML_TYPE_F32, hidden)
        g.ggml_set_input(self.x)
        h = self.x
        for i in range(0, len(layers), len(LAYER_MATRICES)):
            wq, wk, wv, wo, wg, wu, wd = tensors[i : i + len(LAYER_MATRICES)]
            q = g.ggml_mul_mat(ctx, wq, h)
            kv = g.ggml_add(ctx, g.ggml_mul_mat(ctx, wk, h), g.ggml_mul_mat(ctx, wv, h))
            a = g.ggml_add(ctx, g.ggml_mul_mat(ctx, wo, q), kv)
            a = g.ggml_rms_norm(ctx, a, RMS_EPS)
            gate = g.ggml_silu(ctx, g.ggml_mul_mat(ctx, wg, a))
            d = g.ggml_mul_mat(ctx, wd, g.ggml_mul(ctx, gate, g.ggml_mul_mat(ctx, wu, a)))
            h = g.ggml_rms_norm(ctx, g.ggml_add(ctx, d, a), RMS_EPS)
        self.logits = g.ggml_mul_mat(ctx, tensors[-1], h)
        g.ggml_set_output(self.logits)
        self.graph = g.ggml_new_graph(ctx)
        g.ggml_build_forward_expand(self.graph, self.logits)
        self.allocator = g.ggml_gallocr_new(g.ggml_backend_get_default_buffer_type(self.backend))
        if not g.ggml_gallocr_alloc_graph(self.allocator, self.graph):
            raise SystemExit("could not allocate the graph")
        self.vocab = head.ne1
        self.input = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
        self.output = np.empty(self.vocab, dtype=np.float32)

    def extra_buffer_types(self) -> list[Any]:
        """The CPU backend's extra buffer types (AMX, repack, ...), in the order llama.cpp tries them."""
        g = self.g
        registry = g.ggml_backend_dev_backend_reg(self.device)
        address = g.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_dev_get_extra_bufts")
        if not address:
            return []
        function = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
        listed = function(self.device)
        found = []
        while listed[len(found)]:
            found.append(listed[len(found)])
        return found

    def supports(self, buft: Any, weight: Any) -> bool:
        """Whether `buft` takes a mat-vec of `weight` by one f32 vector: llama.cpp's own test, a mul_mat
        node whose weight sits in an empty buffer of that type, asked of the device."""
        g = self.g
        ctx = g.ggml_init(
            g.ggml_init_params(mem_size=g.ggml_tensor_overhead() * 4, mem_buffer=None, no_alloc=True)
        )
        try:
            vector = g.ggml_new_tensor_1d(ctx, g.GGML_TYPE_F32, weight.contents.ne[0])
            op = g.ggml_mul_mat(ctx, weight, vector)
            probe = g.ggml_backend_buft_alloc_buffer(buft, 0)
            saved = weight.contents.buffer
            weight.contents.buffer = probe
            try:
                return bool(g.ggml_backend_dev_supports_op(self.device, op))
            finally:
                weight.contents.buffer = saved
                g.ggml_backend_buffer_free(probe)
        finally:
            g.ggml_free(ctx)

    def set_threads(self, threads: int) -> None:
        self.g.ggml_backend_cpu_set_n_threads(self.backend, threads)

    def token(self) -> None:
        """One decode token's mat-vecs: write the input, compute the graph, read the logits."""
        g = self.g
        g.ggml_backend_tensor_set(self.x, self.input.ctypes.data_as(ctypes.c_void_p), 0, self.input.nbytes)
        if g.ggml_backend_graph_compute(self.backend, self.graph) != 0:
            raise SystemExit("graph compute failed")
        g.ggml_backend_tensor_get(
            self.logits, self.output.ctypes.data_as(ctypes.c_void_p), 0, self.output.nbytes
        )

    def tokens_per_s(self, tokens: int) -> float:
        self.token()  # warm-up, as llama-bench's
        start = time.perf_counter()
        for _ in range(tokens):
            self.token()
        return tokens / (time.perf_counter() - start)

    def free(self) -> None:
        g = self.g
        g.ggml_gallocr_free(self.allocator)
        g.ggml_free(self.graph_ctx)
        for ctx, buffer in self.buffers:
            g.ggml_backend_buffer_free(buffer)
            g.ggml_free(ctx)
        g.ggml_free(self.weight_ctx)
        g.ggml_backend_free(self.backend)


def llama_bench(llamacpp: Path, model: Path, threads: int, tokens: int) -> float:
    """tokens/s of one llama-bench tg run (-p 0 -n TOKENS -r 1; it warms up first)."""
    command = [str(llamacpp_binary(llamacpp, "llama-bench")), "-m", str(model), "-o", "json"]
    command += ["-p", "0", "-n", str(tokens), "-r", "1", "-t", str(threads)]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=1800).stdout
    return float(json.loads(output)[0]["avg_ts"])


@dataclass
class Row:
    kind: str
    threads: int
    ggml: list[float] = field(default_factory=list)  # tokens/s, one per round
    llamacpp: list[float] = field(default_factory=list)
    weight_bytes: int = 0
    placement: dict[str, int] = field(default_factory=dict)


def ggml_build_info() -> dict[str, Any]:
    g = ggml_module()
    features = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_int8", "fma", "f16c")
    info: dict[str, Any] = {name: bool(getattr(g, f"ggml_cpu_has_{name}")()) for name in features}
    info["version"] = getattr(g, "__version__", "?")
    return info


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llamacpp", type=Path, required=True, help="a llama.cpp tree built in DIR/build")
    parser.add_argument("--types", default="bf16,q8_0,q4_0", help="comma-separated GGUF types")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of ggml and llama-bench")
    parser.add_argument("--tokens", type=int, default=64, help="tokens a measurement (llama-bench -n)")
    parser.add_argument("--no-extra", action="store_true", help="ggml weights in plain CPU buffers only")
    parser.add_argument(
        "--no-amx",
        action="store_true",
        help="leave out the AMX buffer type, as the ggml engine does (compare with a llama.cpp built without AMX)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.types.split(",") if kind.strip()]
    threads = [int(t) for t in args.threads.split(",")]
    use_extra = not args.no_extra

    checkpoint = shape_checkpoint("0.6b")
    models = {kind: gguf_file(checkpoint, args.llamacpp, kind) for kind in kinds}
    load_start = machine_load()
    rows: dict[tuple[str, int], Row] = {(k, t): Row(k, t) for k in kinds for t in threads}
    for kind in kinds:
        layers, head = gguf_weights(models[kind])
        graph = GemvGraph(layers, head, use_extra, use_amx=not args.no_amx)
        for t in threads:
            rows[kind, t].weight_bytes = sum(w.data.nbytes for w in [*layers, head])
            rows[kind, t].placement = graph.placement
        for round_ in range(args.rounds):
            for t in threads:
                graph.set_threads(t)
                rows[kind, t].ggml.append(graph.tokens_per_s(args.tokens))
                rows[kind, t].llamacpp.append(llama_bench(args.llamacpp, models[kind], t, args.tokens))
                print(
                    f"  round {round_ + 1}: {kind} {t} thread(s): ggml {rows[kind, t].ggml[-1]:.1f} tok/s, "
                    f"llama.cpp {rows[kind, t].llamacpp[-1]:.1f} tok/s",
                    file=sys.stderr,
                )
        graph.free()
    load_end = machine_load()

    commit = llamacpp_commit(args.llamacpp)
    info = ggml_build_info()
    print(
        f"ggml-python {info['version']}; llama.cpp {commit}; extra buffer types: {'on' if use_extra else 'off'}"
        + (" (no AMX)" if args.no_amx else "")
    )
    print(f"machine: {load_start} at the start, {load_end.split(', ')[-1]} at the end")
    print(
        f"{'type':<5} {'thr':>3}  {'ggml tok/s':>20}  {'ms':>5}  {'llama.cpp tok/s':>20}  {'ms':>5}  {'ratio':>5}  GB/s"
    )
    results = []
    for row in rows.values():
        ours, theirs = spread(row.ggml), spread(row.llamacpp)
        ratio = ours["median"] / theirs["median"]
        rate = row.weight_bytes * ours["median"] / 1e9
        print(
            f"{row.kind:<5} {row.threads:>3}  {show(ours):>20}  {1e3 / ours['median']:>5.1f}  "
            f"{show(theirs):>20}  {1e3 / theirs['median']:>5.1f}  {ratio:>5.2f}  {rate:.1f}"
        )
        results.append(
            {
                "type": row.kind,
                "threads": row.threads,
                "ggml_tokens_per_s": ours,
                "llamacpp_tokens_per_s": theirs,
                "ggml_samples": row.ggml,
                "llamacpp_samples": row.llamacpp,
                "ratio": ratio,
                "weight_bytes_per_token": row.weight_bytes,
                "placement": row.placement,
            }
        )
    for kind in kinds:
        print(f"{kind}: weights in {rows[kind, threads[0]].placement}")
    if args.json:
        summary = {
            "bench": "ggml_gemv",
            "llamacpp_commit": commit,
            "ggml": info,
            "extra_buffer_types": use_extra,
            "amx": not args.no_amx,
            "tokens": args.tokens,
            "rounds": args.rounds,
            "load_start": load_start,
            "load_end": load_end,
            "rows": results,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
