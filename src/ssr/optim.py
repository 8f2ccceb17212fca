"""AdamW parameter groups and the warm-up + poly learning-rate factor; docs/method.md §4.10.

Reproduces mmcv's `DefaultOptimizerConstructor` custom keys by substring of the full parameter name
(decode head lr ×10, `norm` without weight decay) and mmcv's `poly` policy with linear warm-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ssr.errors import ConfigError


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    head_lr_mult: float = 10.0,
    no_decay_keys: Sequence[str] = ("norm",),
) -> list[dict[str, Any]]:
    """Optimiser parameter groups, one per distinct (lr, weight decay), with `param_names`.

    Rules are matched as substrings of each full name, longest key first, equal lengths in
    alphabetical order, first match wins (mmcv's order). So `head` (lr × `head_lr_mult`, decay × 1)
    beats `norm` (decay 0) in a name containing both: same length, `head` < `norm`. The decode
    head's BatchNorms therefore keep weight decay, as in the reference; the MiT LayerNorms (all
    named `norm*`) lose it. Unmatched names get (lr, weight_decay). Parameters with
    `requires_grad=False` (teacher, frozen copies, SAM) are left out.
    """
    rules: dict[str, tuple[float, float]] = {key: (1.0, 0.0) for key in no_decay_keys}
    rules["head"] = (head_lr_mult, 1.0)
    keys = sorted(sorted(rules), key=len, reverse=True)  # stable: alphabetical within a length
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lr_mult, decay_mult = next((rules[k] for k in keys if k in name), (1.0, 1.0))
        key = (lr * lr_mult, weight_decay * decay_mult)
        group = groups.setdefault(
            key, {"params": [], "param_names": [], "lr": key[0], "weight_decay": key[1]}
        )
        group["params"].append(param)
        group["param_names"].append(name)
    if not groups:
        raise ValueError("param_groups: no trainable parameters (all have requires_grad=False)")
    return list(groups.values())


def poly_warmup_factor(
    step: int,
    max_steps: int = 40000,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
    power: float = 1.0,
) -> float:
    """Multiplier of each group's base lr after `step` completed iterations (for `LambdaLR`).

    poly: (1 − t/max_steps)^power down to 0 at `max_steps`; for t < `warmup_steps` it is further
    scaled by 1 − (1 − t/warmup_steps)·(1 − warmup_ratio), i.e. `warmup_ratio` at t = 0 and the
    plain poly value from t = `warmup_steps` on (mmcv's linear warm-up on top of the regular lr).
    """
    if step < 0 or max_steps <= 0:
        raise ValueError(f"lr schedule needs step >= 0 and max_steps > 0, got {step}, {max_steps}")
    factor = max(1.0 - step / max_steps, 0.0) ** power
    if step < warmup_steps:
        factor *= 1.0 - (1.0 - step / warmup_steps) * (1.0 - warmup_ratio)
    return factor


# (key, the smallest value that works, whether the key must be an integer)
_OPTIM_RANGES = (
    ("lr", 0.0, False),
    ("weight_decay", 0.0, False),
    ("head_lr_mult", 0.0, False),
    ("warmup_steps", 0, True),
    ("warmup_ratio", 0.0, False),
    ("power", 0.0, False),
)


def check_optim_config(optim: Mapping[str, Any]) -> None:
    """Type and range of the `optim` settings, checked when the module is built (not at step 1)."""
    for key, minimum, integer in _OPTIM_RANGES:
        value = optim.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (integer and not isinstance(value, int)) or value < minimum:
            kind = "an integer" if integer else "a number"
            raise ConfigError(f"optim.{key}={value!r} must be {kind} >= {minimum}")
    if optim["lr"] == 0:
        raise ConfigError("optim.lr=0 would train nothing; the papers use 6e-5")
