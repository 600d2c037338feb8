"""The KL-VAE: shapes and the latent interface, posterior sampling, config and input errors,
the loss's terms, analytic FLOPs against XLA's count, sharded vs unsharded loss and gradients,
and a few Trainer steps lowering the loss. (diffusers parity: tests/convert/test_vae_import.py.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tessera.configs import load_config
from tessera.configs.base import base_config
from tessera.models.create import ModelSpec
from tessera.models.vae import VAE, flops_per_example
from tessera.train.tasks.vae import vae_loss
from tessera.train.trainer import Trainer

SMALL = dict(block_out_channels=(8, 16), layers_per_block=1, norm_groups=4, latent_channels=4)
TOL = dict(rtol=1e-5, atol=1e-5)


def vae_config(image_size=16, **vae):
    """A whole config for task vae on 16 x 16 shapes images, float32, no evaluation."""
    c = base_config()
    c.model.update(name="vae", family="AutoencoderKL", image_size=image_size, dtype="float32")
    c.model.vae.update(**{**SMALL, **vae})
    c.data.update(source="shapes", global_batch_size=8, augment=False)
    c.train.update(task="vae", progress=False, tensorboard=False)
    c.optim.update(warmup_steps=0, learning_rate=3e-3)
    c.eval.every = 0
    c.checkpoint.async_save = False
    return c


def images(batch=2, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)


def random_params(spec, seed=0):
    """Host-made parameters (jitted init compiles slowly on CPU): kernels N(0, 1 / fan_in),
    norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        noise = rng.normal(size=s.shape)
        if len(s.shape) == 1:
            value = 1 + 0.1 * noise if path[-1].key == "scale" else 0.1 * noise
        else:
            value = noise / np.sqrt(np.prod(s.shape[:-1]))
        return jnp.asarray(value, s.dtype)

    return jax.tree_util.tree_map_with_path(one, spec.shapes)


@pytest.fixture(scope="module")
def built():
    """(spec, params, run): run(params, images, key) -> every output the tests read, in one
    compiled function."""
    spec = ModelSpec(vae_config(shift_factor=0.3, scaling_factor=0.5).model)

    @jax.jit
    def run(params, x, key):
        m = spec.merge(params)
        mean, logvar = m.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return dict(
            mean=mean, logvar=logvar, eval=m(x, rng=key), train=m(x, rng=key, train=True),
            decode_mean=m.decode(mean), decode_z=m.decode(z), z=z, latents=m.to_latents(x),
            sampled_latents=m.to_latents(x, key), back=m.from_latents(m.to_latents(x)),
            small=m.decode(jnp.zeros((1, 3, 5, 4))),
        )

    return spec, random_params(spec), run


@pytest.fixture(scope="module")
def outputs(built):
    spec, params, run = built
    return run(params, images(), jax.random.key(3))


def test_shapes_and_latent_interface(built, outputs):
    spec, _, _ = built
    assert nnx.eval_shape(lambda: VAE(spec.cfg, rngs=nnx.Rngs(0))).downsample_factor == 2
    mean, logvar = outputs["mean"], outputs["logvar"]
    assert mean.shape == logvar.shape == (2, 8, 8, 4) and mean.dtype == jnp.float32
    rec = outputs["eval"].reconstruction
    assert rec.shape == (2, 16, 16, 3) and rec.dtype == jnp.float32
    np.testing.assert_array_equal(outputs["eval"].mean, mean)
    np.testing.assert_allclose(rec, outputs["decode_mean"], **TOL)
    np.testing.assert_allclose(outputs["latents"], (mean - 0.3) * 0.5, **TOL)
    np.testing.assert_allclose(outputs["back"], outputs["decode_mean"], **TOL)
    assert outputs["small"].shape == (1, 6, 10, 3)  # fully convolutional: any multiple of f


def test_posterior_sampling(outputs):
    """Training decodes mean + exp(logvar / 2) * eps; evaluation the mean, ignoring the rng."""
    np.testing.assert_allclose(outputs["train"].reconstruction, outputs["decode_z"], **TOL)
    assert not np.allclose(outputs["train"].reconstruction, outputs["eval"].reconstruction,
                           atol=1e-4)
    np.testing.assert_allclose(outputs["sampled_latents"], (outputs["z"] - 0.3) * 0.5, **TOL)


def test_logvar_is_clipped(built):
    spec, params, run = built
    params = jax.tree.map(lambda a: a, params)
    params["quant_conv"]["bias"] = jnp.array([0.0] * 4 + [100.0, -100.0, 5.0, 0.0])
    logvar = np.asarray(run(params, images(), jax.random.key(0))["logvar"])
    np.testing.assert_array_equal(logvar[..., :2].max(axis=(0, 1, 2)), [20.0, -30.0])


@pytest.mark.parametrize(
    "image_size, vae, message",
    [
        (18, dict(block_out_channels=(8, 16, 16)),
         r"^model.image_size=18 is not divisible by the vae's downsampling factor 4 "),
        (16, dict(block_out_channels=(8, 10)),
         r"^model.vae.block_out_channels=\(8, 10\): 10 channels do not split into "
         r"model.vae.norm_groups=4 groups"),
        (16, dict(block_out_channels=()), r"^model.vae.block_out_channels=\(\) needs positive"),
        (16, dict(latent_channels=0), r"^model.vae.latent_channels=0 must be positive"),
    ],
)
def test_config_errors(image_size, vae, message):
    with pytest.raises(ValueError, match=message):
        nnx.eval_shape(lambda: VAE(vae_config(image_size, **vae).model, rngs=nnx.Rngs(0)))


def test_input_errors(built):
    spec, _, _ = built

    def check(method, shape, dtype=jnp.float32):
        x = jax.ShapeDtypeStruct(shape, dtype)
        jax.eval_shape(lambda p, x: getattr(spec.merge(p), method)(x), spec.shapes, x)

    with pytest.raises(ValueError, match=r"^vae expects images float \[batch, height, width, 3\] "
                                         r"\(model.num_channels\), height and width multiples "
                                         r"of 2; got float32 \[2, 15, 16, 3\]"):
        check("encode", (2, 15, 16, 3))
    with pytest.raises(ValueError, match=r"got float32 \[16, 16, 3\]"):
        check("__call__", (16, 16, 3))
    with pytest.raises(ValueError, match=r"got int32 \[1, 16, 16, 3\]"):
        check("encode", (1, 16, 16, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"latents float \[batch, height, width, 4\] "
                                         r"\(model.vae.latent_channels\).* got float32 "
                                         r"\[1, 8, 8, 3\]"):
        check("decode", (1, 8, 8, 3))


def test_loss_terms():
    x = jnp.zeros((3, 4, 4, 3))
    rec = x + 0.2  # error 0.2 on [-1, 1]: 0.1 on [0, 1], mse 0.01, 20 dB
    mean, logvar = jnp.ones((3, 2, 2, 4)), jnp.zeros((3, 2, 2, 4))  # KL 0.5 per element
    valid = jnp.array([1.0, 1.0, 0.0])  # the third row pads
    total, weight, sums = vae_loss(x, rec, mean, logvar, valid, kl_weight=0.1)
    assert float(weight) == 2.0
    np.testing.assert_allclose(total, 2 * (0.2 + 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_allclose([sums["rec_loss"], sums["kl"], sums["psnr"]], [0.4, 1.0, 40.0],
                               rtol=1e-5)
    total, _, sums = vae_loss(x, rec, 0 * mean, logvar, valid, kl_weight=0.1,
                              reconstruction_loss="mse")
    np.testing.assert_allclose([total, sums["kl"]], [2 * 0.04, 0.0], rtol=1e-5, atol=1e-7)
    # A reconstruction outside [-1, 1] is clipped for the PSNR only.
    _, _, sums = vae_loss(x + 1, x + 3, mean, logvar, valid, kl_weight=0.0)
    assert float(sums["rec_loss"]) == 4.0 and float(sums["psnr"]) == 200.0


def test_flops_match_cost_analysis():
    """The analytic count (convs and attention) is within 3% of XLA's forward FLOPs, which also
    count the norms and activations the analytic one leaves out."""
    cfg = vae_config(image_size=32, block_out_channels=(32, 64, 64), norm_groups=8).model
    spec = ModelSpec(cfg)
    forward = jax.jit(lambda p, x: spec.merge(p)(x).reconstruction)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    xla = forward.lower(spec.shapes, x).cost_analysis()["flops"]
    ours = 2 * flops_per_example(cfg)
    assert ours == pytest.approx(xla, rel=0.03), (ours, xla)
    assert ours < xla


@pytest.mark.parametrize("preset, params", [("tiny", 954_567), ("sd", 83_653_863)])
def test_presets_have_diffusers_parameter_counts(preset, params):
    """Abstract shapes only; the counts are diffusers' AutoencoderKL's of the same shape (SD's
    VAE: 83,653,863)."""
    cfg = load_config(f"vae:{preset}")
    assert (cfg.model.name, cfg.train.task) == ("vae", "vae")
    assert ModelSpec(cfg.model).num_params() == params


def _grads(cfg, tmp_path, devices=None):
    """(trainer, params, batch, (loss, grads)) of the first train batch, from host-made
    parameters placed with the trainer's shardings."""
    trainer = Trainer(cfg, str(tmp_path), devices)
    params = jax.device_put(random_params(trainer.spec), trainer.state_shardings["params"])
    batch = trainer.device_batch(next(trainer.task.make_data("train")))
    return trainer, params, batch, jax.device_get(trainer.grads(params, batch))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    cfg = vae_config()
    cfg.mesh.update(data=1)
    return _grads(cfg, tmp_path_factory.mktemp("single"), jax.devices()[:1])


@pytest.mark.filterwarnings("ignore:parameter .* is not divisible by mesh axes")
def test_sharded_loss_and_grads_match_unsharded(single, tmp_path):
    *_, (loss_1, grads_1) = single
    cfg = vae_config()
    cfg.mesh.update(data=2, fsdp=4)
    trainer, params, _, (loss_n, grads_n) = _grads(cfg, tmp_path)
    assert trainer.mesh.devices.size == 8
    kernel = params["decoder"]["mid_block"]["resnets"]["0"]["conv1"]["kernel"]
    assert tuple(kernel.sharding.spec) == (None, None, "fsdp", None)  # conv_in over fsdp
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads_1, grads_n)


def test_trainer_steps_lower_the_loss(single):
    trainer, params, batch, _ = single
    state = {"params": params, "opt_state": jax.jit(trainer.tx.init)(params),
             "step": jnp.zeros((), jnp.int32)}
    losses = []
    for _ in range(4):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.9 * losses[0], losses
    assert {"rec_loss", "kl", "psnr"} <= set(metrics)
