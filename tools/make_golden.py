"""Golden files for Hugging Face parity: tiny random HF models and their reference outputs.

Runs the reference library (torch + transformers), never the tests: the tests read what this
writes under ``tests/fixtures/hf/<name>/``:

  config.json, model.safetensors    the model as ``save_pretrained`` writes it (float32; one
                                    fixture is split into two shards + model.safetensors.index.json)
  reference.npz                     tokens int32 [2, T], logits float32 [2, T, V] (full forward),
                                    prompt int32 [P], greedy int32 [8]: the greedy continuation
                                    (full forward passes; generate() with its cache must agree)

plus ``tests/fixtures/hf/VERSIONS.json`` (torch and transformers versions). Seeds are fixed, so a
rerun with the same versions writes the same bytes.

Set up a side virtualenv (not the project's):

  PYENV_VERSION=3.11.7 python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy

then ``/tmp/hfvenv/bin/python tools/make_golden.py`` (all fixtures, or ``--only llama,qwen3``).

``--check-export`` checks the other direction: for each fixture it runs tessera's own
``convert import`` then ``convert export`` with ``--tessera-python`` (the project's interpreter),
loads the exported directory with transformers and compares its logits and greedy continuation
with the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")

SEQ_LEN = 20
PROMPT_LEN = 6
NEW_TOKENS = 8
MIN_MARGIN = 1e-2  # smallest top-1 / top-2 logit gap allowed on the greedy path
VOCAB = 272  # above the 259 ids of tessera's byte tokenizer, so imports fine-tune on its corpus

_ATTENTION = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (config class name, config kwargs, max_shard_size for save_pretrained or None)
MODELS: dict[str, tuple[str, dict, str | None]] = {
    # Llama-2 style, saved in two shards to exercise the index.
    "llama": ("LlamaConfig", dict(_ATTENTION), "75KB"),
    "llama3": (
        "LlamaConfig",
        dict(
            _ATTENTION,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            max_position_embeddings=2048,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            ),
        ),
        None,
    ),
    "llama_yarn": (
        "LlamaConfig",
        dict(
            _ATTENTION,
            max_position_embeddings=256,
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
        ),
        None,
    ),
    "mistral": ("MistralConfig", dict(_ATTENTION, sliding_window=8), None),
    "qwen2": ("Qwen2Config", dict(_ATTENTION, rope_theta=1000000.0), None),
    # Qwen2 with mixed layers: layer_types [full, full, sliding, sliding] (layers with index >=
    # max_window_layers slide); a window of 4 is much shorter than SEQ_LEN.
    "qwen2_window": (
        "Qwen2Config",
        dict(
            _ATTENTION,
            rope_theta=1000000.0,
            num_hidden_layers=4,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
        ),
        None,
    ),
    "qwen3": ("Qwen3Config", dict(_ATTENTION, head_dim=16, rope_theta=1000000.0), None),
    "mamba": (
        "MambaConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
            time_step_rank=4,
            layer_norm_epsilon=1e-5,
            use_mambapy=False,
            # Tied, the residual stream of a random model is mostly the current token's
            # embedding and greedy decoding repeats it; untied gives a varied continuation.
            tie_word_embeddings=False,
        ),
        None,
    ),
    "mamba2": (
        "Mamba2Config",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            state_size=8,
            num_hidden_layers=2,
            expand=2,
            head_dim=16,
            num_heads=4,
            n_groups=1,
            chunk_size=8,
            conv_kernel=4,
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=False,
        ),
        None,
    ),
}


def build(name: str, seed: int) -> torch.nn.Module:
    """The tiny model ``name`` with every tensor random: norm scales near 1, biases (which HF
    initialises to zero) non-zero, SSM A_log / D / dt_bias perturbed."""
    config_cls, kwargs, _ = MODELS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = pname.rsplit(".", 1)[-1]
            if "norm" in pname and leaf == "weight":
                p.copy_(1.0 + 0.2 * noise)
            elif leaf in ("bias", "A_log", "D", "dt_bias"):
                p.add_(0.2 * noise)
    model.eval()
    return model


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
    out = model(torch.from_numpy(tokens.astype(np.int64)), use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: np.ndarray) -> tuple[np.ndarray, float]:
    """Greedy continuation by full forward passes (no cache), and the smallest top-2 gap."""
    seq = list(prompt)
    margin = float("inf")
    for _ in range(NEW_TOKENS):
        last = logits_of(model, np.asarray([seq]))[0, -1]
        top2 = np.sort(last)[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        seq.append(int(np.argmax(last)))
    cont = np.asarray(seq[len(prompt) :], np.int32)
    model.generation_config.eos_token_id = None  # random weights: EOS is just another token
    generated = model.generate(
        torch.from_numpy(np.asarray([prompt], np.int64)),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
    )[0, len(prompt) :].numpy()
    if not np.array_equal(generated, cont):
        raise RuntimeError(f"generate() with cache {generated} != full-forward greedy {cont}")
    return cont, margin


@torch.no_grad()
def window_effect(name: str, model: torch.nn.Module, tokens: np.ndarray) -> None:
    """For a config that mixes full and sliding layers: the same weights with every layer full
    must give different logits past the window, or the fixture would not test the window."""
    layer_types = getattr(model.config, "layer_types", None) or []
    if "sliding_attention" not in layer_types:
        return
    config_cls, kwargs, _ = MODELS[name]
    config = getattr(transformers, config_cls)(**dict(kwargs, use_sliding_window=False))
    full = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    full.load_state_dict(model.state_dict())
    diff = np.abs(logits_of(full.eval(), tokens) - logits_of(model, tokens))
    window = model.config.sliding_window
    inside, past = float(diff[:, :window].max()), float(diff[:, window:].max())
    print(
        f"{name}: layer_types {layer_types}; all-full logits differ by {inside:.2e} at positions "
        f"< {window}, {past:.2e} after"
    )
    if past <= 1e-3:
        raise RuntimeError(f"{name}: logits hardly depend on the sliding window ({past:.2e})")


def make(name: str) -> None:
    """Write tests/fixtures/hf/<name>/; retries seeds until the greedy path has clear margins."""
    for seed in range(20):
        model = build(name, seed)
        rng = np.random.default_rng(seed)
        tokens = rng.integers(3, VOCAB, size=(2, SEQ_LEN), dtype=np.int32)
        prompt = rng.integers(3, VOCAB, size=(PROMPT_LEN,), dtype=np.int32)
        cont, margin = greedy(model, prompt)
        if margin >= MIN_MARGIN and len(set(cont.tolist())) > 2:
            break
    else:
        raise RuntimeError(
            f"{name}: no seed gives a varied greedy path with margin >= {MIN_MARGIN}"
        )
    window_effect(name, model, tokens)
    out = os.path.join(FIXTURES, name)
    shutil.rmtree(out, ignore_errors=True)
    shard = MODELS[name][2]
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    if os.path.exists(os.path.join(out, "generation_config.json")):
        os.remove(os.path.join(out, "generation_config.json"))  # nothing the tests read
    np.savez(
        os.path.join(out, "reference.npz"),
        tokens=tokens,
        logits=logits_of(model, tokens).astype(np.float32),
        prompt=prompt,
        greedy=cont,
    )
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    print(f"{name}: seed {seed}, greedy {cont.tolist()} (margin {margin:.3g}), files {sizes}")


def check_export(name: str, python: str, tol: float) -> bool:
    """tessera import + export of fixture ``name``, then transformers loads the export."""
    shard = MODELS[name][2]  # a fixture saved in shards is exported in shards too
    with tempfile.TemporaryDirectory() as tmp:
        workdir, exported = os.path.join(tmp, "work"), os.path.join(tmp, "hf")
        for cmd in (
            ["import", f"--hf_dir={os.path.join(FIXTURES, name)}", f"--workdir={workdir}"],
            ["export", f"--workdir={workdir}", f"--hf_dir={exported}"]
            + ([f"--max_shard_size={shard}"] if shard else []),
        ):
            run = subprocess.run(
                [python, "-m", "tessera.convert", *cmd],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )
            if run.returncode:
                print(f"{name}: tessera convert {cmd[0]} failed:\n{run.stderr}")
                return False
        ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            exported, attn_implementation="eager", dtype=torch.float32
        ).eval()
        diff = float(np.max(np.abs(logits_of(model, ref["tokens"]) - ref["logits"])))
        cont, _ = greedy(model, ref["prompt"])
        same = bool(np.array_equal(cont, ref["greedy"]))
        files = sorted(os.listdir(exported))
        ok = diff <= tol and same
        print(
            f"{name}: export loads in transformers {transformers.__version__}: max |logit diff| "
            f"{diff:.2e}, greedy {'identical' if same else 'DIFFERENT'}, files {files}: "
            f"{'OK' if ok else 'FAIL'}"
        )
        return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    parser.add_argument(
        "--check-export",
        action="store_true",
        help="import + export each fixture with tessera and load the export with transformers",
    )
    project_venv = os.path.join(ROOT, ".venv", "bin", "python")
    parser.add_argument(
        "--tessera-python",
        default=os.environ.get(
            "TESSERA_PYTHON", project_venv if os.path.exists(project_venv) else "python3"
        ),
        help="interpreter of the tessera project for --check-export (default: $TESSERA_PYTHON, "
        "else the project's .venv)",
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="logit tolerance for the check")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown fixtures {unknown}; known: {sorted(MODELS)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if args.check_export:
        available = [n for n in names if os.path.isdir(os.path.join(FIXTURES, n))]
        results = [check_export(n, args.tessera_python, args.tol) for n in available]
        sys.exit(0 if all(results) else 1)
    torch.set_num_threads(1)
    for name in names:
        make(name)
    with open(os.path.join(FIXTURES, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)
        f.write("\n")


if __name__ == "__main__":
    main()
