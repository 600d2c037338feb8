"""Golden files for Hugging Face parity: tiny random HF models and their reference outputs.

Runs the reference library (torch + transformers), never the tests: the tests read what this
writes under ``tests/fixtures/hf/<name>/``:

  config.json, model.safetensors    the model as ``save_pretrained`` writes it (float32; one
                                    fixture is split into two shards + model.safetensors.index.json)
  reference.npz                     decoder LMs (``MODELS``): tokens int32 [2, T], logits float32
                                    [2, T, V] (full forward), prompt int32 [P], greedy int32 [8]:
                                    the greedy continuation (full forward passes; generate() with
                                    its cache must agree).
                                    Image classifiers (``IMAGE_MODELS``): pixel_values float32
                                    [2, C, S, S] (HF's NCHW, uniform in [-1, 1] like normalised
                                    pixels; tessera takes .transpose(0, 2, 3, 1), NHWC), logits
                                    float32 [2, K]

plus ``tests/fixtures/hf/VERSIONS.json`` (torch and transformers versions;
tools/make_fla_golden.py adds flash-linear-attention's for the RWKV-6, RWKV-7 and RetNet
fixtures it writes). Seeds are fixed, so a rerun with the same versions writes the same bytes.

Set up a side virtualenv (not the project's):

  PYENV_VERSION=3.11.7 python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy

then ``/tmp/hfvenv/bin/python tools/make_golden.py`` (all fixtures, or ``--only llama,qwen3``).

``--check-export`` checks the other direction: for each fixture it runs tessera's own
``convert import`` then ``convert export`` with ``--tessera-python`` (the project's interpreter),
loads the exported directory with transformers and compares it with the reference: the logits
and greedy continuation (LMs), the logits and class names (image classifiers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")

SEQ_LEN = 20
PROMPT_LEN = 6
NEW_TOKENS = 8
MIN_MARGIN = 1e-2  # smallest top-1 / top-2 logit gap allowed on the greedy path
MIN_ROUTER_MARGIN = 1e-4  # smallest k-th / (k+1)-th expert score gap (MoE fixtures)
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

def _deepseek(*, mscale: float, **routing) -> dict:
    """A DeepSeek-V2/V3 fixture: one dense layer then two MLA + MoE layers, yarn RoPE with
    DeepSeek's mscale (= mscale_all_dim), ``routing`` the version's router keys."""
    return dict(
        _ATTENTION,
        num_hidden_layers=3,
        num_key_value_heads=4,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_shared_experts=1,
        num_experts_per_tok=2,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=64,
            mscale=mscale,
            mscale_all_dim=mscale,
            beta_fast=32.0,
            beta_slow=1.0,
        ),
        **routing,
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
    # Mixture-of-experts and multi-head latent attention (MLA). Three layers where a family
    # has dense first layers (DeepSeek's first_k_dense_replace), so both kinds are tested.
    "mixtral": (
        "MixtralConfig",
        dict(_ATTENTION, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
        None,
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            _ATTENTION,
            rope_theta=1000000.0,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        None,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(
            _ATTENTION,
            head_dim=16,
            rope_theta=1000000.0,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
        None,
    ),
    # DeepSeek-V2-Lite layout: no query compression, softmax routing limited to the best group.
    "deepseek_v2": (
        "DeepseekV2Config",
        _deepseek(
            mscale=0.707,
            n_routed_experts=4,
            q_lora_rank=None,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
            routed_scaling_factor=1.5,
        ),
        None,
    ),
    # DeepSeek-V3 layout: query compression, sigmoid scores with a selection bias, groups
    # scored by their top two, normalised top-k weights scaled by routed_scaling_factor.
    "deepseek_v3": (
        "DeepseekV3Config",
        _deepseek(
            mscale=1.0,
            n_routed_experts=8,
            q_lora_rank=16,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        ),
        None,
    ),
}


IMAGE_SIZE = 32
CLASS_NAMES = ("circle", "square", "triangle", "star", "cross")

# Image classifiers, as MODELS. initializer_range 0.2 (HF: 0.02) so the class token, positions
# and classifier give logits of order 1 rather than ~0; hidden dropout (inactive in eval) checks
# its mapping.
IMAGE_MODELS: dict[str, tuple[str, dict, str | None]] = {
    "vit": (
        "ViTConfig",
        dict(
            image_size=IMAGE_SIZE,
            patch_size=8,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.1,
            initializer_range=0.2,
            id2label=dict(enumerate(CLASS_NAMES)),
            label2id={n: i for i, n in enumerate(CLASS_NAMES)},
        ),
        None,
    ),
}


def spec(name: str) -> tuple[CausalLM | ImageClassifier, tuple[str, dict, str | None]]:
    """(kind, table entry) of fixture ``name``."""
    if name in IMAGE_MODELS:
        return IMAGE_CLASSIFIER, IMAGE_MODELS[name]
    return CAUSAL_LM, MODELS[name]


def build(name: str, seed: int) -> torch.nn.Module:
    """The tiny model ``name`` with every tensor random: norm scales near 1, biases (which HF
    initialises to zero) non-zero, SSM A_log / D / dt_bias perturbed."""
    kind, (config_cls, kwargs, _) = spec(name)
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = kind.auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            leaf = pname.rsplit(".", 1)[-1]
            if "norm" in pname and leaf == "weight":
                p.copy_(1.0 + 0.2 * noise)
            elif leaf in ("bias", "A_log", "D", "dt_bias"):
                p.add_(0.2 * noise)
        for bname, buf in model.named_buffers():  # DeepSeek-V3's routing bias is a buffer
            if bname.endswith("e_score_correction_bias"):
                buf.copy_(0.2 * torch.randn(buf.shape, generator=gen))
    model.eval()
    return model


@torch.no_grad()
def router_margin(model: torch.nn.Module, tokens: np.ndarray) -> float:
    """Smallest gap, over every token and MoE layer, between the k-th and (k+1)-th expert
    selection score (router logits; sigmoid scores + bias for DeepSeek-V3): a fixture whose
    routing sits on a tie would test float noise, not the port. inf for dense models."""
    config = model.config
    k = getattr(config, "num_experts_per_tok", None)
    gaps: list[float] = []

    def hook(module: torch.nn.Module, args: tuple, _out: object) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        scores = x @ module.weight.float().T
        bias = getattr(module, "e_score_correction_bias", None)
        if bias is not None:
            scores = scores.sigmoid() + bias
        top = scores.sort(dim=-1, descending=True).values
        gaps.append(float((top[:, k - 1] - top[:, k]).min()))

    handles = [
        m.register_forward_hook(hook)
        for n, m in model.named_modules()
        if n.endswith(".gate") and getattr(m, "weight", None) is not None and k
    ]
    try:
        logits_of(model, tokens)
    finally:
        for h in handles:
            h.remove()
    return min(gaps, default=float("inf"))


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


class CausalLM:
    """Decoder LM fixtures: logits of random tokens and a greedy continuation with clear top-2
    margins, varied enough to test decoding."""

    auto = transformers.AutoModelForCausalLM

    def reference(
        self, name: str, model: torch.nn.Module, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], str] | None:
        """(reference arrays, a note) of this model, or None when its greedy path is unclear."""
        tokens = rng.integers(3, VOCAB, size=(2, SEQ_LEN), dtype=np.int32)
        prompt = rng.integers(3, VOCAB, size=(PROMPT_LEN,), dtype=np.int32)
        cont, margin = greedy(model, prompt)
        if margin < MIN_MARGIN or len(set(cont.tolist())) <= 2:
            return None
        # Causal: one forward over prompt + continuation routes every greedy step's tokens.
        routing = min(
            router_margin(model, tokens),
            router_margin(model, np.concatenate([prompt, cont[:-1]])[None]),
        )
        if routing < MIN_ROUTER_MARGIN:
            return None
        window_effect(name, model, tokens)
        ref = dict(
            tokens=tokens,
            logits=logits_of(model, tokens).astype(np.float32),
            prompt=prompt,
            greedy=cont,
        )
        note = f"greedy {cont.tolist()} (margin {margin:.3g})"
        if routing != float("inf"):
            note += f", router margin {routing:.3g}"
        return ref, note

    def check(
        self, model: torch.nn.Module, ref: Mapping[str, np.ndarray], source: str, tol: float
    ) -> tuple[str, bool]:
        """(a note comparing ``model`` with the reference, whether they agree); ``source``: the
        fixture's directory."""
        del source  # the reference holds all an LM is checked against
        diff = float(np.max(np.abs(logits_of(model, ref["tokens"]) - ref["logits"])))
        cont, _ = greedy(model, ref["prompt"])
        same = bool(np.array_equal(cont, ref["greedy"]))
        text = f"max |logit diff| {diff:.2e}, greedy {'identical' if same else 'DIFFERENT'}"
        return text, diff <= tol and same


@torch.no_grad()
def class_logits(model: torch.nn.Module, pixel_values: np.ndarray) -> np.ndarray:
    return model(pixel_values=torch.from_numpy(pixel_values)).logits.float().numpy()


class ImageClassifier:
    """Image classifier fixtures: logits of random normalised images, each image's top class
    clear (top-2 margin) and the two images' classes different."""

    auto = transformers.AutoModelForImageClassification

    def reference(
        self, name: str, model: torch.nn.Module, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], str] | None:
        c = model.config
        shape = (2, c.num_channels, c.image_size, c.image_size)
        pixels = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        logits = class_logits(model, pixels).astype(np.float32)
        top2 = np.sort(logits, axis=-1)[:, -2:]
        margin = float(np.min(top2[:, 1] - top2[:, 0]))
        classes = np.argmax(logits, axis=-1)
        if margin < MIN_MARGIN or classes[0] == classes[1]:
            return None
        labels = [c.id2label[int(i)] for i in classes]
        return dict(pixel_values=pixels, logits=logits), (
            f"classes {labels} (margin {margin:.3g}), logit std {float(logits.std()):.3g}"
        )

    def check(
        self, model: torch.nn.Module, ref: Mapping[str, np.ndarray], source: str, tol: float
    ) -> tuple[str, bool]:
        diff = float(np.max(np.abs(class_logits(model, ref["pixel_values"]) - ref["logits"])))
        want = transformers.AutoConfig.from_pretrained(source).id2label
        same = model.config.id2label == want
        text = f"max |logit diff| {diff:.2e}, id2label {'identical' if same else 'DIFFERENT'}"
        return text, diff <= tol and same


CAUSAL_LM, IMAGE_CLASSIFIER = CausalLM(), ImageClassifier()


def make(name: str) -> None:
    """Write tests/fixtures/hf/<name>/; retries seeds until the reference is clear."""
    kind, (_, _, shard) = spec(name)
    for seed in range(20):
        model = build(name, seed)
        made = kind.reference(name, model, np.random.default_rng(seed))
        if made is not None:
            break
    else:
        raise RuntimeError(f"{name}: no seed gives a clear reference (margin >= {MIN_MARGIN})")
    ref, note = made
    save(name, model, ref, f"seed {seed}, {note}", shard)


def save(
    name: str, model: torch.nn.Module, ref: Mapping[str, np.ndarray], note: str, shard: str | None
) -> None:
    """Write tests/fixtures/hf/<name>/: ``model`` as ``save_pretrained`` writes it (in shards of
    ``shard`` when given) and ``ref`` as reference.npz."""
    out = os.path.join(FIXTURES, name)
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    if os.path.exists(os.path.join(out, "generation_config.json")):
        os.remove(os.path.join(out, "generation_config.json"))  # nothing the tests read
    np.savez(os.path.join(out, "reference.npz"), **ref)
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    print(f"{name}: {note}, files {sizes}")


def record_versions(**libraries: str) -> None:
    """Merge torch's, transformers' and ``libraries``' versions into VERSIONS.json (keeping
    the entries other tools wrote)."""
    path = os.path.join(FIXTURES, "VERSIONS.json")
    versions = {}
    if os.path.exists(path):
        with open(path) as f:
            versions = json.load(f)
    versions.update(torch=torch.__version__, transformers=transformers.__version__, **libraries)
    with open(path, "w") as f:
        json.dump(versions, f)
        f.write("\n")


def check_export(
    name: str,
    python: str,
    tol: float,
    kind: CausalLM | ImageClassifier = CAUSAL_LM,
    shard: str | None = None,
) -> bool:
    """tessera import + export of fixture ``name`` (a ``kind`` model, exported in shards of
    ``shard`` as it was saved), then transformers loads the export."""
    source = os.path.join(FIXTURES, name)
    with tempfile.TemporaryDirectory() as tmp:
        workdir, exported = os.path.join(tmp, "work"), os.path.join(tmp, "hf")
        for cmd in (
            ["import", f"--hf_dir={source}", f"--workdir={workdir}"],
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
        ref = np.load(os.path.join(source, "reference.npz"))
        model = kind.auto.from_pretrained(
            exported, attn_implementation="eager", dtype=torch.float32
        ).eval()
        text, ok = kind.check(model, ref, source, tol)
        files = sorted(os.listdir(exported))
        print(
            f"{name}: export loads in transformers {transformers.__version__}: {text}, "
            f"files {files}: {'OK' if ok else 'FAIL'}"
        )
        return ok


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """--check-export, --tessera-python, --tol."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
    add_export_arguments(parser)
    args = parser.parse_args()
    known = [*MODELS, *IMAGE_MODELS]
    names = [n for n in args.only.split(",") if n] or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown fixtures {unknown}; known: {sorted(known)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if args.check_export:
        available = [n for n in names if os.path.isdir(os.path.join(FIXTURES, n))]
        results = []
        for n in available:
            kind, (_, _, shard) = spec(n)
            results.append(check_export(n, args.tessera_python, args.tol, kind, shard))
        sys.exit(0 if all(results) else 1)
    torch.set_num_threads(1)
    for name in names:
        make(name)
    record_versions()


if __name__ == "__main__":
    main()
