"""What the bench scripts share: the checkpoint shape they measure and a free loopback port."""

from __future__ import annotations

from meshllm.models.tiny import TinySpec
from meshllm.runtime.local_workers import free_ports

# qwen3-shaped, about 105 MB in float32: big enough that one decode step costs a few milliseconds on a core.
SPEC = TinySpec(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=1024,
)


def free_port() -> int:
    return free_ports(1)[0]
