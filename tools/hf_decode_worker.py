"""Hugging Face side of ``python -m tessera.bench decode --against=hf``: builds random
transformers models and times ``generate`` on them, driven over JSON lines.

Runs in the side virtualenv with torch and transformers (never the project's; see
tools/make_golden.py for how it is made):

  PYENV_VERSION=3.11.7 python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy

Protocol: one JSON request per line on stdin, one JSON reply per line on stdout (logs go to
stderr). Every reply has ``ok``; a failed request replies ``{"ok": false, "error": "..."}`` and
the worker keeps serving.

  {"op": "build", "model_class": "LlamaForCausalLM", "config": {"model_type": "llama", ...},
   "seed": 0, "dir": "/tmp/x"}
      a random float32 model (transformers' own init from ``seed``), kept for ``generate`` and
      saved with ``save_pretrained`` (safetensors) into ``dir``. Reply: ``params`` (count),
      ``threads`` (torch.get_num_threads(), torch's default), ``attn_implementation``, versions.
  {"op": "generate", "prompts": [[ids...], ...], "max_new_tokens": 256}
      greedy (``do_sample=False``), no EOS stop, prompts of equal length (no padding). Reply:
      ``tokens`` (the new tokens, one list per prompt) and ``seconds``, the wall time of the
      ``generate`` call alone (prefill included), measured here.
  {"op": "quit"}
      reply, then exit.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any, TextIO

import torch
import transformers


class Worker:
    """The model of the last ``build`` and the request handlers."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None

    def build(self, model_class: str, config: dict[str, Any], seed: int, dir: str) -> dict:
        cls = getattr(transformers, model_class, None)
        if cls is None or not hasattr(cls, "config_class"):
            raise ValueError(f"transformers has no model class {model_class!r}")
        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type != cls.config_class.model_type:
            raise ValueError(
                f"config model_type {model_type!r} does not match {model_class} "
                f"({cls.config_class.model_type!r})"
            )
        hf_config = cls.config_class(**config)
        torch.manual_seed(seed)
        model = cls._from_config(hf_config, dtype=torch.float32).eval()
        # Random weights: EOS is just another token, and generate must run every step.
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = config.get("pad_token_id", 0)
        model.save_pretrained(dir)
        self.model = model
        return {
            "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> dict:
        if self.model is None:
            raise ValueError("generate before build")
        if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
            raise ValueError("prompts must be non-empty lists of token ids, all the same length")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = torch.tensor(prompts, dtype=torch.long)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
        )
        seconds = time.perf_counter() - t0
        new = out[:, ids.shape[1]:]
        if new.shape[1] != max_new_tokens:
            raise RuntimeError(f"generate made {new.shape[1]} tokens, not {max_new_tokens}")
        return {"tokens": new.tolist(), "seconds": seconds}


def serve(requests: TextIO, replies: TextIO) -> None:
    """Answer JSON-line requests until ``quit`` or end of input."""
    worker = Worker()
    for line in requests:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            op = req.pop("op", None)
            if op == "quit":
                reply: dict = {}
            elif op == "build":
                reply = worker.build(**req)
            elif op == "generate":
                reply = worker.generate(**req)
            else:
                raise ValueError(f"unknown op {op!r} (build, generate, quit)")
            reply["ok"] = True
        except Exception as e:  # reported to the harness, which raises it
            traceback.print_exc(file=sys.stderr)
            op, reply = None, {"ok": False, "error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
        if op == "quit":
            return


def main() -> None:
    # Replies own the real stdout; anything a library prints goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
