"""Names and numbers defined once: engines, dtypes, default ports, the coordinator's own stage name."""

from __future__ import annotations

from typing import Literal

ENGINES = ("torch", "mlx", "ggml")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # config.json model_type values every engine runs
DTYPES = ("float32", "bfloat16", "float16")
EngineName = Literal["torch", "mlx", "ggml"]
DtypeName = Literal["float32", "bfloat16", "float16"]
AUTO_DTYPE = "auto"  # a model's own dtype: `Checkpoint.own_dtype`
# Weights held quantized: int8 per output channel, int4 in groups of DEFAULT_GROUP_SIZE inputs.
QUANTIZE_MODES = ("int8", "int4")
QuantizeMode = Literal["int8", "int4"]
DEFAULT_GROUP_SIZE = 64

DEFAULT_API_PORT = 8100  # the coordinator's HTTP API
DEFAULT_STAGE_PORT = 50051  # the first worker's gRPC port; further workers on one host count up
# "0": no calibration and no speed prediction at start (a second or so per device; the tests set it).
PREDICT_ENV = "MESHLLM_PREDICT"
# Stages that share a machine's cores take them all for a step alone in the pipeline while the others
# wait. GNU libgomp's idle threads spin 300000 times (about 15 ms on a CPU whose `pause` is slow) before
# they sleep, so a stage that just finished its step would spin on the cores the next stage needs: with
# 10000 spins (still enough for the barriers inside a step), one stream through two stages on a 2-core
# machine went from 56 to 52 ms a token. Set for the stages of a machine that share it, unless set already.
SHARED_CORES_ENV = {"GOMP_SPINCOUNT": "10000"}
TOKEN_ENV = "MESHLLM_TOKEN"  # where `meshllm worker` finds the cluster token when no flag names one
# How `meshllm serve` names its own stage (in --memory and /distributed/gpu-info).
COORDINATOR_STAGE = "coordinator"

# How stages that share a compute unit run (`serve --shared-stages`): the first is the default.
SHARED_STAGES = ("turns", "together", "auto")
