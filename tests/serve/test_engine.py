"""The decode engine: cached greedy decode == argmax of uncached forward passes (one device,
data x tensor mesh, sliding window with chunked prefill), stops, bucketing, seeds, bad input."""

import jax
import pytest

from tessera.configs import load_config
from tessera.data import ByteTokenizer
from tessera.kernels import cpu as cpu_kernels
from tessera.models.create import ModelSpec
from tessera.serve import Decoder, DecodeStats, SamplingParams, engine, generate, length_bucket
from tessera.serve.engine import single_device_mesh
from tessera.sharding import make_mesh, make_rules

from .conftest import TINY, make_model, reference_greedy

# Mixed lengths (BOS = 1 first), all in the 16-token bucket.
PROMPTS = [[1, 60, 61, 62, 63, 64], [1, 100], [1, *range(120, 133)]]
STEPS = 8


@pytest.fixture(scope="module")
def greedy_ref(tiny):
    _, spec, params = tiny
    return reference_greedy(spec, params, PROMPTS, STEPS)


def tokens_of(completions):
    return [c.tokens for c in completions]


def test_greedy_matches_uncached_forward(tiny_decoder, greedy_ref):
    stats = DecodeStats()
    out = tiny_decoder.generate(PROMPTS, None, STEPS, stop_tokens=(), stats=stats)
    assert tokens_of(out) == greedy_ref
    assert all(c.finish_reason == "length" for c in out)
    assert [c.prompt_tokens for c in out] == PROMPTS
    assert stats.prefill_tokens == sum(map(len, PROMPTS))
    assert stats.decode_tokens == len(PROMPTS) * (STEPS - 1)  # the first comes from prefill
    # K and V: 2 layers x 2 kv heads x 32 dims x 4 bytes each, plus the int32 slot position;
    # the per-row length is the fixed per-sequence part.
    assert stats.cache.bytes_per_token == 2 * 2 * 2 * 32 * 4 + 4
    assert stats.cache.bytes_per_sequence == 4


@pytest.mark.skipif(cpu_kernels._compiler() is None, reason="no C++ compiler on this host")
def test_decode_step_runs_the_cpu_kernels(tiny, tiny_decoder, greedy_ref):
    """A float32 decode step on one CPU device runs tessera's CPU kernels (dense products and
    decode attention), prefill does not; with them off the greedy tokens are the same."""
    programs = tiny_decoder.lower(len(PROMPTS), 16, STEPS)
    decode_text, prefill_text = programs["decode"].as_text(), programs["prefill"].as_text()
    assert "tessera_cpu_dense" in decode_text and "tessera_cpu_decode_attention" in decode_text
    assert "tessera_cpu" not in prefill_text
    _, spec, params = tiny
    with cpu_kernels.disabled():
        plain = Decoder(spec, params, single_device_mesh(), decode_chunk=4)
        assert "tessera_cpu" not in plain.lower(len(PROMPTS), 16, STEPS)["decode"].as_text()
        assert tokens_of(plain.generate(PROMPTS, None, STEPS, stop_tokens=())) == greedy_ref


def test_sharded_data_tensor_mesh(tiny, greedy_ref):
    cfg, spec, params = make_model(TINY + ",mesh.data=2,mesh.tensor=2")
    mesh = make_mesh(cfg.mesh, jax.devices()[:4])
    decoder = Decoder(spec, tiny[2], mesh, cfg.mesh.rules, decode_chunk=3)
    wq = decoder.params["units"][0]["blocks"][0]["mixer"]["wq"]  # layer 0, unrolled
    assert "tensor" in str(wq.sharding.spec)
    prompts = [*PROMPTS, [1, 7, 8, 9]]  # 4 rows: split over data=2
    out = decoder.generate(prompts, None, STEPS, stop_tokens=())
    ref = reference_greedy(spec, tiny[2], prompts[3:], STEPS)
    assert tokens_of(out) == greedy_ref + ref


def test_sliding_window_bounded_cache_and_chunked_prefill():
    _, spec, params = make_model(TINY + ",model.sliding_window=8", seed=1)
    decoder = Decoder(spec, params, prefill_chunk=8, decode_chunk=5)
    prompts = [[1, *range(40, 52)], [1, *range(70, 80)], [1, 5, 6]]  # 13, 11 and 3 tokens
    stats = DecodeStats()
    out = decoder.generate(prompts, None, 12, stop_tokens=(), stats=stats)
    assert tokens_of(out) == reference_greedy(spec, params, prompts, 12)
    assert stats.cache.slots == 8
    assert decoder.cache_info(4, 1000).slots == 8


@pytest.mark.slow
def test_growing_cache_changes_nothing(tiny):
    """A long request starts with a cache of 128 slots and grows it to all 256 (the tiny
    model's max_seq_len) when the rows reach it: a decode program per cache size, one grow
    program, and the tokens equal a decode over all 256 slots from the start."""
    _, spec, params = tiny
    prompts = [[1, *range(40, 60)], [1, 7, 8]]
    grown, full = Decoder(spec, params), Decoder(spec, params, grow_cache=False)
    stats = DecodeStats()
    out = grown.generate(prompts, None, 200, stop_tokens=(), stats=stats)
    assert tokens_of(out) == tokens_of(full.generate(prompts, None, 200, stop_tokens=()))
    assert stats.cache.slots == 256 and grown.cache_slots_for(1, 256) == engine.MIN_CACHE_SLOTS
    assert sorted(k[2] for k in grown.executables if k[0] == "decode") == [128, 256]
    assert [k[2:4] for k in grown.executables if k[0] == "grow"] == [(128, 256)]
    assert [k[2] for k in full.executables if k[0] == "decode"] == [256]
    assert not any(k[0] == "grow" for k in full.executables)


def test_stop_token_per_sequence(tiny_decoder, greedy_ref):
    first = greedy_ref[0]
    i = next(i for i in range(1, STEPS) if first[i] not in first[:i])
    stop = first[i]
    out = tiny_decoder.generate(PROMPTS, None, STEPS, stop_tokens=(stop,))
    for c, ref in zip(out, greedy_ref):
        if stop in ref:
            assert c.tokens == ref[: ref.index(stop)] and c.finish_reason == "eos"
        else:
            assert c.tokens == ref and c.finish_reason == "length"
    assert out[0].tokens == first[:i]


def test_stop_string_per_sequence_and_streaming(tiny_decoder, greedy_ref):
    tok = ByteTokenizer()
    # A printable ASCII token that first appears after the first token of some row b.
    b, j = next(
        (b, j) for b, row in enumerate(greedy_ref) for j in range(1, STEPS)
        if 35 <= row[j] < 129 and chr(row[j] - 3) not in tok.decode(row[:j])
    )
    stop = chr(greedy_ref[b][j] - 3)
    streamed = {}
    out = tiny_decoder.generate(
        PROMPTS, None, STEPS, stop=[stop], stop_tokens=(),
        on_update=lambda i, c: streamed.setdefault(i, []).append(c.text),
    )
    for i, (c, ref) in enumerate(zip(out, greedy_ref)):
        cut = next((k for k in range(1, STEPS + 1) if stop in tok.decode(ref[:k])), None)
        if cut is None:
            assert c.tokens == ref and c.finish_reason == "length"
        else:
            full = tok.decode(ref[:cut])
            assert c.tokens == ref[:cut] and c.finish_reason == "stop"
            assert c.text == full[: full.index(stop)]
        # Streamed text only grows, and never shows what is later cut.
        assert all(c.text.startswith(t) for t in streamed[i])
        assert streamed[i][-1] == c.text
    assert out[b].finish_reason == "stop" and len(out[b].tokens) == j + 1


def test_lengths_in_one_bucket_compile_once(tiny_decoder):
    assert [length_bucket(n) for n in (1, 5, 16, 17, 100)] == [16, 16, 16, 32, 128]
    run = lambda prompts: tiny_decoder.generate(
        prompts, None, STEPS, stop_tokens=(), batch_size=4
    )
    run([[1, 2, 3, 4, 5], [1, *range(10, 19)]])  # 5 and 10 tokens
    before = tiny_decoder.executables
    run([[1, 2, 3], [1, *range(30, 45)], [1, 2, 3, 4, 5, 6, 7]])  # 3, 16 and 7 tokens
    assert tiny_decoder.executables == before
    assert sum(k[0] == "prefill" and k[1] == 4 and k[-1] == () for k in before) == 1


def test_sampling_seeds_and_batch_independence(tiny_decoder):
    sampling = SamplingParams(temperature=1.0, top_k=100, seed=1)
    whole = tokens_of(tiny_decoder.generate(PROMPTS, sampling, STEPS, stop_tokens=()))
    again = tokens_of(tiny_decoder.generate(PROMPTS, sampling, STEPS, stop_tokens=()))
    assert whole == again
    other = SamplingParams(temperature=1.0, top_k=100, seed=2)
    assert tokens_of(tiny_decoder.generate(PROMPTS, other, STEPS, stop_tokens=())) != whole
    # Split into two requests (same padded batch): each row draws the same tokens.
    head = tiny_decoder.generate(PROMPTS[:1], sampling, STEPS, stop_tokens=(), batch_size=4)
    tail = tiny_decoder.generate(
        PROMPTS[1:], sampling, STEPS, stop_tokens=(), first_row=1, batch_size=4
    )
    assert tokens_of(head + tail) == whole


def test_generate_on_a_module_and_text_prompts(tiny):
    cfg, spec, params = tiny
    model = spec.merge(params)
    out = generate(model, ["ab", "hello"], SamplingParams(), 4, stop_tokens=())
    tok = ByteTokenizer()
    assert out[0].prompt == "ab" and out[0].prompt_tokens == [1, *tok.encode("ab")]
    assert tokens_of(out) == reference_greedy(spec, params, [c.prompt_tokens for c in out], 4)
    assert out[1].text == tok.decode(out[1].tokens)


@pytest.mark.parametrize(
    "prompts, max_new, message",
    [
        ([""], 4, "prompt 0 is empty"),
        ([[1, 2], []], 4, "prompt 1 is empty"),
        ([[1, 259]], 4, r"token id 259 is outside the model's vocabulary \[0, 259\)"),
        ([[1, -3]], 4, "token id -3 is outside"),
        (["ok", "bad \ud800"], 4, "prompt 1: the tokenizer cannot encode"),
        ([[1] * 300], 4, r"300 tokens, longer than the context \(model.max_seq_len=256"),
        ([[1] * 250], 10, "250 tokens; with max_new_tokens=10 it needs 260 positions"),
        ([[1, 2]], 0, "max_new_tokens must be >= 1"),
        ("abc", 4, "a list of prompts"),
        ([], 4, "no prompts"),
    ],
)
def test_bad_input(tiny_decoder, prompts, max_new, message):
    with pytest.raises(ValueError, match=message):
        tiny_decoder.generate(prompts, None, max_new)


def test_recurrent_cache_is_constant_size():
    """A pure Mamba-2 stack keeps one slot and fixed state, whatever the context length."""
    cfg = load_config("mamba2:tiny,model.dtype=float32")
    spec = ModelSpec(cfg.model)
    decoder = Decoder(spec, spec.init(0, single_device_mesh(), make_rules()))
    short, long = decoder.cache_info(2, 64), decoder.cache_info(2, 8192)
    assert short.slots == long.slots == 1
    assert short.bytes == long.bytes
    m = cfg.model
    heads = m.ssm.expand * m.d_model // m.ssm.head_dim
    ssm = heads * m.ssm.head_dim * m.ssm.state_dim * 4
    conv = (m.ssm.conv_width - 1) * (m.ssm.expand * m.d_model + 2 * m.ssm.state_dim) * 4
    assert long.bytes_per_sequence == m.num_layers * (ssm + conv) + 4
