"""A stand-in for tools/hf_decode_worker.py that needs no torch: the same JSON-lines protocol,
with tessera as the "transformers" side.

``build`` makes random tessera parameters for the HF config (``tessera_config``) and exports
them with ``save_hf``; ``generate`` decodes them greedily with tessera, then changes the token
at position ``WRONG_AT`` of the last row (when there are two rows or more), so the harness must
report exactly one mismatching row, first at ``WRONG_AT``.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from tessera.bench.against_hf import IdTokenizer  # noqa: E402
from tessera.convert import family_for, save_hf  # noqa: E402
from tessera.convert.configs import tessera_config  # noqa: E402
from tessera.models.create import ModelSpec  # noqa: E402
from tessera.serve.engine import Decoder  # noqa: E402
from tessera.serve.sampling import SamplingParams  # noqa: E402
from tessera.sharding import make_mesh, make_rules  # noqa: E402

WRONG_AT = 2


def main() -> None:
    decoder = None
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        try:
            if op == "quit":
                reply: dict = {}
            elif op == "build":
                config = tessera_config(req["config"], overrides={"model.dtype": "float32"})
                family = family_for(config.model.family)
                if req["model_class"] != family.architecture:
                    raise ValueError(f"no model class {req['model_class']!r}")
                devices = jax.devices()[:1]
                mesh, rules = make_mesh(config.mesh, devices), make_rules(config.mesh.rules)
                spec = ModelSpec(config.model)
                params = spec.init(req["seed"], mesh, rules)
                save_hf(params, config, req["dir"])
                vocab = int(config.model.vocab_size)
                decoder = Decoder(spec, params, mesh, rules, tokenizer=IdTokenizer(vocab))
                reply = {"params": spec.num_params(), "threads": 1}
            elif op == "generate":
                if decoder is None:
                    raise ValueError("generate before build")
                t0 = time.perf_counter()
                out = decoder.generate(req["prompts"], SamplingParams(), req["max_new_tokens"],
                                       stop_tokens=())
                tokens = [c.tokens for c in out]
                if len(tokens) > 1 and len(tokens[-1]) > WRONG_AT:
                    tokens[-1][WRONG_AT] = (tokens[-1][WRONG_AT] + 1) % decoder.vocab_size
                reply = {"tokens": tokens, "seconds": time.perf_counter() - t0}
            else:
                raise ValueError(f"unknown op {op!r}")
            reply["ok"] = True
        except Exception as e:
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)
        if op == "quit":
            return


if __name__ == "__main__":
    main()
