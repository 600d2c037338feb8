"""Decode engine: bucketed prefill into the model's cache, a jitted step loop, sampling, loading
checkpoints for decoding. The command line is ``python -m tessera.serve.decode``."""

from tessera.serve.engine import Decoder, generate, length_bucket, single_device_mesh
from tessera.serve.loading import load_decoder, restore_params
from tessera.serve.outputs import CacheInfo, Completion, DecodeStats
from tessera.serve.sampling import SamplingParams, process_logits, sample

__all__ = [
    "CacheInfo",
    "Completion",
    "DecodeStats",
    "Decoder",
    "SamplingParams",
    "generate",
    "length_bucket",
    "load_decoder",
    "process_logits",
    "restore_params",
    "sample",
    "single_device_mesh",
]
