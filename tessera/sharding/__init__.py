"""Named-mesh sharding: mesh construction, the logical-axis rules table, constraint helpers."""

from tessera.sharding.context import (
    active,
    constrain,
    is_axis_names,
    logical_sharding,
    state_shardings,
    use_mesh,
    variable_names,
)
from tessera.sharding.kernels import shard_map_kernel as shard_map_kernel
from tessera.sharding.mesh import MESH_AXES, make_mesh, mesh_shape
from tessera.sharding.rules import (
    DEFAULT_RULES,
    default_rules,
    logical_to_spec,
    make_rules,
    parse_rules,
    register_logical_rules,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "active",
    "constrain",
    "default_rules",
    "is_axis_names",
    "logical_sharding",
    "logical_to_spec",
    "make_mesh",
    "make_rules",
    "mesh_shape",
    "parse_rules",
    "register_logical_rules",
    "state_shardings",
    "use_mesh",
    "variable_names",
]
