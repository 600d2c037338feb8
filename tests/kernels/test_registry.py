"""The kernel registry contract on a toy op: auto picks by support and heuristics in order, named
impls fail loudly saying why, unknown names list the registered ones, register(before=...)."""

import jax
import jax.numpy as jnp
import pytest

from tessera.kernels.registry import Impl, KernelUnavailableError, Op


def needs_even_length(x, *, scale):
    return None if x.shape[0] % 2 == 0 else f"length {x.shape[0]} is odd"


def big_only(x, *, scale):
    return None if x.shape[0] >= 8 else f"length {x.shape[0]} < 8"


def toy_op():
    """fast: even lengths only, auto from 8 on; exact: anything; approx: only when named."""
    return Op(
        "toy",
        [
            Impl("fast", lambda x, *, scale: ("fast", x * scale), needs_even_length, big_only),
            Impl("exact", lambda x, *, scale: ("exact", x * scale)),
            Impl("approx", lambda x, *, scale: ("approx", x * scale), auto=False),
        ],
        aliases={"xla": "exact"},
    )


def picked(op, x, impl="auto"):
    return op(x, scale=2.0, impl=impl)[0]


def test_auto_takes_the_first_impl_that_accepts_and_wants_the_inputs():
    op = toy_op()
    assert picked(op, jnp.ones(8)) == "fast"
    assert picked(op, jnp.ones(9)) == "exact"  # fast declines odd lengths
    assert picked(op, jnp.ones(4)) == "exact"  # fast supports it, but auto's heuristic says no
    name, out = op(jnp.ones(8), scale=2.0)
    assert name == "fast" and float(out.sum()) == 16.0


def test_auto_picks_under_jit_from_static_shapes():
    op = toy_op()
    names = []

    def run(x):
        name, out = op(x, scale=3.0)
        names.append(name)
        return out

    assert jax.jit(run)(jnp.ones(9)).sum() == 27.0
    assert names == ["exact"]


def test_named_impls_run_even_where_auto_would_not():
    op = toy_op()
    assert picked(op, jnp.ones(4), "fast") == "fast"
    assert picked(op, jnp.ones(8), "approx") == "approx"
    assert picked(op, jnp.ones(8), "xla") == "exact"  # an alias


def test_named_impl_that_cannot_run_says_why():
    with pytest.raises(KernelUnavailableError, match="toy impl 'fast' cannot run these inputs: "
                                                     "length 9 is odd"):
        picked(toy_op(), jnp.ones(9), "fast")
    assert issubclass(KernelUnavailableError, ValueError)


def test_unknown_impl_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown toy impl 'pallas_tpu'; valid: auto, fast, "
                                         r"exact, approx, xla$"):
        picked(toy_op(), jnp.ones(8), "pallas_tpu")


def test_auto_with_no_taker_lists_every_reason():
    op = Op("toy", [Impl("fast", lambda x, *, scale: x, needs_even_length)])
    with pytest.raises(KernelUnavailableError, match=r"no toy impl .*fast: length 3 is odd"):
        op(jnp.ones(3), scale=1.0)


def test_explain_lists_every_impl_with_its_reason():
    op = toy_op()
    assert op.explain(jnp.ones(9), scale=1.0) == [
        ("fast", "length 9 is odd"),
        ("exact", None),
        ("approx", "auto skips it: only when named"),
    ]
    assert op.explain(jnp.ones(4), scale=1.0)[0] == ("fast", "auto skips it: length 4 < 8")
    assert op.explain(jnp.ones(8), scale=1.0)[0] == ("fast", None)


def test_register_before_puts_an_impl_ahead_for_auto():
    op = toy_op()
    on_tpu = lambda x, *, scale: None if jax.default_backend() == "tpu" else "needs a TPU"
    op.register(Impl("pallas_tpu", lambda x, *, scale: ("pallas", x), on_tpu), before="fast")
    op.register(Impl("anything", lambda x, *, scale: ("anything", x)), before="exact")
    op.register(Impl("last", lambda x, *, scale: ("last", x)))
    assert op.names == ("pallas_tpu", "fast", "anything", "exact", "approx", "last", "xla")
    assert op.explain(jnp.ones(3), scale=1.0)[0] == ("pallas_tpu", "needs a TPU")
    assert picked(op, jnp.ones(3)) == "anything"  # pallas_tpu and fast decline, next one runs
    with pytest.raises(KernelUnavailableError, match="'pallas_tpu' cannot run.*needs a TPU"):
        picked(op, jnp.ones(8), "pallas_tpu")


@pytest.mark.parametrize("name, before", [("exact", None), ("auto", None), ("xla", None),
                                          ("new", "missing")])
def test_register_rejects_taken_names_and_unknown_anchors(name, before):
    with pytest.raises(ValueError, match="already taken|unknown toy impl 'missing'"):
        toy_op().register(Impl(name, lambda x, *, scale: x), before=before)
