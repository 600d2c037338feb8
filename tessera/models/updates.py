"""Per-layer statistics and rule-updated parameters of a block stack, located by depth.

Statistics in a model's aux are stacked over the layers that emit them, in depth order
(``models/stack.py: collect_aux``). A mixer class declares the statistics it always emits in
``AUX_STATS``, so row i of a statistic belongs to the i-th layer whose mixer declares it
(``stat_depths``); metrics name the rows by depth. A mixer's ``RULE_UPDATES``
(``layers/base.py: RuleUpdate``) name parameters the optimizer leaves alone and that are set
after each train step from their own layer's row of a statistic: ``rule_targets`` finds them in
the parameter tree (prefix blocks, the scanned unit's stacked blocks, or the unrolled units),
``apply_rule_updates`` applies them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from tessera.configs.base import ConfigDict
from tessera.layers.base import RuleUpdate
from tessera.models.layout import layer_mixers, parse_layout

PyTree = Any


def stat_depths(cfg: ConfigDict, key: str) -> list[int]:
    """Depths of the layers whose mixers declare statistic ``key`` in ``AUX_STATS``: the layer
    of each row of ``aux[key]``."""
    return [
        depth
        for depth, (_, classes) in enumerate(layer_mixers(cfg))
        if any(key in getattr(cls, "AUX_STATS", ()) for cls in classes.values() if cls)
    ]


@dataclasses.dataclass(frozen=True)
class RuleTarget:
    """One rule-updated parameter: its path in the pure parameter tree, the rows of the
    statistic that feed it (one per stacked layer when ``stacked``), the rule and the block
    config it is called with."""

    path: tuple[str | int, ...]
    rows: tuple[int, ...]
    stacked: bool
    update: RuleUpdate
    cfg: Any


def _get(tree: PyTree, path: tuple) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def rule_targets(cfg: ConfigDict, shapes: PyTree) -> list[RuleTarget]:
    """Every rule-updated parameter present in ``shapes`` (a pure tree of the model's
    parameters), for a model built on ``models/stack.py``'s block stack."""
    if "pattern" not in cfg:
        return []
    layout = parse_layout(cfg)
    layers = layer_mixers(cfg)
    rows: dict[str, list[int]] = {}
    targets = []

    def add(paths: list[tuple], depths: list[int], stacked: bool) -> None:
        block_cfg, classes = layers[depths[0]]
        for slot, cls in classes.items():
            for update in getattr(cls, "RULE_UPDATES", ()) if cls else ():
                if update.stat not in rows:
                    rows[update.stat] = stat_depths(cfg, update.stat)
                if update.stat not in getattr(cls, "AUX_STATS", ()):
                    raise ValueError(
                        f"{cls.__name__}: rule update of {update.param!r} reads statistic "
                        f"{update.stat!r}, which it does not declare in AUX_STATS"
                    )
                for path in paths:
                    full = (*path, slot, update.param)
                    if _get(shapes, full) is not None:
                        index = tuple(rows[update.stat].index(d) for d in depths)
                        targets.append(RuleTarget(full, index, stacked, update, block_cfg))

    for i in range(len(layout.prefix)):
        add([("prefix", i)], [i], False)
    for j in range(len(layout.pattern)):
        depths = [layout.layer_index(j, r) for r in range(layout.repeats)]
        if cfg.scan_layers:
            add([("units", "blocks", j)], depths, True)
        else:
            for r, depth in enumerate(depths):
                add([("units", r, "blocks", j)], [depth], False)
    return targets


def rule_mask(targets: list[RuleTarget], shapes: PyTree) -> PyTree:
    """Tree of bools shaped like ``shapes``: True at the rule-updated parameters."""
    paths = {t.path for t in targets}
    return jax.tree_util.tree_map_with_path(
        lambda path, _: tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path) in paths,
        shapes,
    )


def apply_rule_updates(
    targets: list[RuleTarget], params: PyTree, stats: Mapping[str, jax.Array]
) -> PyTree:
    """``params`` with every target replaced by its rule applied to its layer's rows of
    ``stats[target.update.stat]`` ([layers emitting it, ...])."""
    for t in targets:
        stat = stats[t.update.stat]
        value = _get(params, t.path)
        if t.stacked:
            rows = stat[jax.numpy.asarray(t.rows)]
            new = jax.vmap(lambda v, s, t=t: t.update.fn(t.cfg, v, s))(value, rows)
        else:
            new = t.update.fn(t.cfg, value, stat[t.rows[0]])
        params = _replace(params, t.path, new)
    return params


def _replace(tree: PyTree, path: tuple, value: Any) -> PyTree:
    """A copy of the nested dict ``tree`` with ``value`` at ``path`` (shared elsewhere)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _replace(tree[path[0]], path[1:], value)
    return out
