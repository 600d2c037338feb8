import jax
import pytest
from jax.sharding import PartitionSpec as P

from tessera.configs import load_config
from tessera.sharding import MESH_AXES, logical_to_spec, make_mesh, make_rules, mesh_shape


def mesh_cfg(**sizes):
    cfg = load_config("llama:tiny").mesh
    cfg.update(data=1)
    cfg.update(**sizes)
    return cfg


def test_auto_fill_and_axis_order():
    mesh = make_mesh(mesh_cfg(data=-1, tensor=2))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 2}
    assert mesh.devices.size == jax.device_count() == 8


def test_dcn_sizes_multiply_ici():
    shape = mesh_shape(mesh_cfg(data=-1, dcn_data=2), num_devices=8, num_slices=2)
    assert shape["data"] == 8


def test_data_axis_spans_the_slices_by_default():
    cfg = mesh_cfg(fsdp=-1)
    assert mesh_shape(cfg, num_devices=16, num_slices=2) == {
        "data": 2, "fsdp": 8, "expert": 1, "sequence": 1, "tensor": 1
    }
    assert mesh_shape(cfg, num_devices=8, num_slices=1)["data"] == 1
    cfg.update(dcn_data=1, dcn_fsdp=2)  # FSDP across slices instead
    assert mesh_shape(cfg, num_devices=16, num_slices=2)["fsdp"] == 16


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(data=3), "multiply to 3, but there are 8 devices"),
        (dict(data=-1, fsdp=-1), "at most one ICI axis may be -1"),
        (dict(data=-1, tensor=3), "do not divide 8 devices"),
        (dict(data=0), "must be positive or -1"),
    ],
)
def test_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(mesh_cfg(**sizes))


def test_logical_to_spec_rules():
    rules = make_rules()
    sizes = {"data": 2, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2}
    assert logical_to_spec(("embed", "mlp"), rules, sizes) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "length"), rules, sizes) == P(("data", "fsdp"), None)
    # A mesh axis is used once per array, size-1 axes are dropped.
    assert logical_to_spec(("heads", "mlp"), rules, sizes) == P("tensor", None)
    # An axis that does not divide the dimension is dropped rather than failing.
    assert logical_to_spec(("kv_heads",), rules, {"tensor": 4}, shape=(2,)) == P(None)


def test_rule_overrides():
    rules = make_rules("mlp=tensor+fsdp;vocab=")
    assert rules["mlp"] == ("tensor", "fsdp") and rules["vocab"] == ()
    with pytest.raises(ValueError, match="unknown logical axes"):
        make_rules("mlpp=tensor")
    with pytest.raises(ValueError, match="not of the form"):
        make_rules("mlp")


def test_unshardable_parameter_warns_once_and_strict_refuses():
    """2 kv heads cannot split over tensor=4: the warning names the parameter, logical axis,
    mesh axes and size; mesh.strict makes it an error."""
    import warnings

    from tessera.models import create
    from tessera.models.create import ModelSpec

    create._WARNED.clear()  # other tests in this process may have seen the same warning

    cfg = load_config("llama:tiny")
    cfg.mesh.update(data=2, tensor=4)
    spec, mesh, rules = ModelSpec(cfg.model), make_mesh(cfg.mesh), make_rules()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shardings = spec.shardings(mesh, rules)
        spec.shardings(mesh, rules)  # said once per process, not per call
    messages = [str(w.message) for w in caught]
    wk = [m for m in messages if "mixer/wk" in m]
    assert len(wk) == 1, messages
    assert "parameter units/blocks/0/mixer/wk axis 'kv_heads' (size 2)" in wk[0]
    assert "mesh axes tensor = 4" in wk[0] and "replicated" in wk[0]
    assert shardings["units"]["blocks"][0]["mixer"]["wk"].spec == P(None, None, None, None)
    # the query heads (4) do split
    assert shardings["units"]["blocks"][0]["mixer"]["wq"].spec == P(None, None, "tensor", None)
    with pytest.raises(ValueError, match=r"mesh.strict: parameter embed/embedding axis 'vocab' "
                                         r"\(size 259\) .* \(and 3 more\)"):
        spec.shardings(mesh, rules, strict=True)
