"""The model's configuration: one dataclass whose fields document themselves, and its presets.

Every field carries its help text and its allowed range in `knob(...)` metadata, so validation,
the CLI's `--set key=value` parsing and error messages all come from one place. A preset is just a
named dict of field overrides; every field can still be overridden after it.

The helpers at the bottom (`validate`, `apply_overrides`, `flatten`) work on any dataclass built
from knobs, including nested ones; the orchestrator's training config reuses them.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config value outside its allowed range, or an unknown field. The message names the field."""


def knob(default: Any, help: str, *, range: str | None = None, choices: tuple | None = None):
    """A dataclass field with help text and an allowed range such as "[1, 4096]" or "(0, 1]"."""
    return field(default=default, metadata={"help": help, "range": range, "choices": choices})


PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
ENERGY_UPDATES = ("residual", "gated", "replace")
PLANE_SPLITS = ("learned", "arrival")
INTERACTIONS = ("none", "field")
# The fields that fix parameter shapes, in two parts: the lattice's own size, which
# model.transfer changes between progressive-scaling stages, and every other one, which stages
# (and a checkpoint and the config that loads it) must agree on for weights to carry over.
LATTICE_SIZE_FIELDS = ("width", "height", "depth")
CARRIED_SHAPE_FIELDS = ("embed_dim", "mapper_rank", "collector_rank", "neuron_hidden", "neuron_features",
                        "carrier_hidden", "carrier_layers", "energy_update", "plane_split", "skip",
                        "mapper_layer_norm", "split_energy_gain", "energy_channels", "interaction", "field_channels")


@dataclass(frozen=True)
class ModelConfig:
    # --- input and lattice shape -------------------------------------------------------------
    embed_dim: int = knob(384, "teacher embedding size E (384 for all-MiniLM-L6-v2)", range="[1, 16384]")
    width: int = knob(20, "lattice cells along x; the surface is width x height", range="[2, 4096]")
    height: int = knob(20, "lattice cells along y", range="[2, 4096]")
    depth: int = knob(10, "lattice cells along z; the output planes are z=-1 and z=+1", range="[3, 4096]")

    # --- learned components ------------------------------------------------------------------
    mapper_rank: int = knob(
        128, "rank K of the separable input mapper: how many numbers of the embedding reach the "
             "surface (the best linear map through 16 loses to the identity baseline)", range="[1, 1024]")
    collector_rank: int = knob(128, "rank of each plane's separable read-out in the collector", range="[1, 1024]")
    mapper_dropout: float = knob(0.0, "dropout on the embedding inside the mapper (off in eval mode)", range="[0, 1)")
    mapper_layer_norm: bool = knob(
        True, "layer-normalise the embedding inside the mapper, so the energy grid's scale does not "
              "depend on the teacher's embedding norm")
    energy_init_spread: float = knob(
        0.5, "std of the input-dependent part of the initial energy grid at initialisation, so the "
             "output depends on the input from the first step", range="(0, 100]")
    neuron_hidden: int = knob(32, "hidden width of the shared SimpleNeuron MLP", range="[1, 4096]")
    neuron_features: int = knob(16, "features the SimpleNeuron feeds to the carrier", range="[1, 4096]")
    carrier_hidden: int = knob(256, "hidden size Hc of the EnergyCarrier GRU", range="[1, 16384]")
    carrier_layers: int = knob(2, "number of stacked GRU layers L in the EnergyCarrier", range="[1, 16]")
    hidden_noise_std: float = knob(0.01, "std of the noise added to the zero initial carrier state", range="[0, 1]")
    energy_update: str = knob(
        "residual", "how the carrier changes a flow's energy each step: 'residual' adds a learned "
                    "tanh delta (zero at initialisation, so the mapper's energy reaches the planes), "
                    "'gated' moves it toward a tanh target by a learned gate, 'replace' overwrites it "
                    "with the tanh head (the original model)", choices=ENERGY_UPDATES)
    plane_split: str = knob(
        "learned", "how a deposit divides between the planes z=-1 and z=+1: 'learned' splits each "
                   "flow's energy by a sigmoid head of the carrier (differentiable, so both planes "
                   "get input-dependent energy), 'arrival' puts all of it on the plane the flow "
                   "reached (the original model)", choices=PLANE_SPLITS)
    split_energy_gain: float = knob(
        4.0, "initial gain g of the deposited energy in the learned split, share to plane z=+1 = "
             "sigmoid(split_head(state) + g * energy) with g learned: positive energy leans to one "
             "plane and negative to the other, so the planes hold different parts of the signal "
             "(0: the head alone, which left the planes near-identical halves on debug)", range="[0, 100]")
    skip: bool = knob(
        True, "prediction = skip_scale * embedding + collector(planes), with a learned scalar "
              "skip_scale; validation then also reports the skip-only and lattice-only ablations")
    energy_channels: int = knob(
        1, "values of energy each flow carries: the mapper writes this many maps of the embedding, "
           "the carrier updates (and splits) each, the collector reads 2 x this many planes; 1 is the "
           "original scalar energy", range="[1, 64]")
    interaction: str = knob(
        "none", "how flows exchange information while they travel: 'none', or 'field': each flow "
                "writes field_channels values at its cell of a coarse 3D field, which mixes every cell "
                "with its neighbours from step to step, and reads back its cell and the sample's mean "
                "into the carrier at the next step (local and distant connections)", choices=INTERACTIONS)
    field_channels: int = knob(8, "values per cell of the interaction field", range="[1, 256]")
    freeze_carrier: bool = knob(
        False, "keep the neuron and the carrier (GRU and heads) at their initialisation and train only the "
               "mapper, collector and skip scale: the ablation that measures what a trained carrier adds")
    field_resolution: int = knob(
        8, "cells of the interaction field along each axis (it spans the lattice whatever its size)",
        range="[2, 64]")

    # --- flow dynamics -----------------------------------------------------------------------
    max_dz_cells: float | None = knob(
        None, "largest displacement per step along z, in lattice cells (None: depth/8)", range="(0, 4096]")
    max_dxy_cells: float | None = knob(
        None, "largest displacement per step along x and y, in cells (None: width/16 and height/16, "
              "at least 1)", range="(0, 4096]")
    reflect_walls: bool = knob(True, "x and y reflect at the walls (False: clamp)")
    spawn_threshold: float = knob(
        0.12, "a flow moving farther than this in one step (normalized units) spawns "
              "floor(len/threshold)-1 children", range="(0, 8]")
    max_spawn_per_step: int = knob(2, "most children one flow may spawn in one step", range="[0, 64]")
    max_flows_per_sample: int | None = knob(
        None, "cap on the flows ever created per sample (None: 2 x width x height)", range="[4, 2147483647]")

    # --- adaptive convergence ----------------------------------------------------------------
    min_steps: int | None = knob(
        None, "never stop before this many steps (None: the straight-path minimum to reach a plane)",
        range="[1, 10000]")
    max_steps: int | None = knob(None, "hard step limit (None: 4 x the straight-path minimum)", range="[1, 10000]")
    convergence_threshold: float = knob(0.95, "stop once arrived/created reaches this", range="(0, 1]")
    convergence_patience: int = knob(
        3, "stop after this many consecutive steps (counted from min_steps) without completion "
           "improving by min_improvement", range="[1, 10000]")
    min_improvement: float = knob(0.005, "completion gain that counts as improvement", range="[0, 1]")

    # --- numerics and memory -----------------------------------------------------------------
    precision: str = knob("fp32", "autocast for the neuron, carrier and heads; positions and "
                                  "splatting stay fp32", choices=PRECISIONS)
    activation_checkpointing: bool = knob(
        False, "recompute each flow step in backward instead of keeping its activations")
    saved_state_dtype: str = knob(
        "fp32", "dtype of the carrier state carried between steps, which is what activation "
                "checkpointing saves; bf16 halves that memory", choices=("fp32", "bf16"))
    loss_mse_weight: float = knob(0.0, "weight of an MSE term added to the 1 - cosine loss", range="[0, 1000]")
    travel_loss_weight: float = knob(
        0.1, "weight of the mean distance projected flows still had to go; arrival is discrete, so "
             "this is the only gradient that teaches flows to head out (0: off)",
        range="[0, 1000]")

    # --- derived quantities ------------------------------------------------------------------
    @property
    def surface(self) -> int:
        return self.width * self.height

    def step_limits(self) -> tuple[float, float, float]:
        """Largest displacement per step along (x, y, z) in normalized [-1, 1] units, of a resolved
        config. The flow processor asks on every forward pass, so this reads the fields and does not
        resolve (and validate) the config again."""
        if self.max_dxy_cells is None or self.max_dz_cells is None:
            raise ValueError("step_limits needs a resolved config (ModelConfig.resolved())")
        return (self.max_dxy_cells * 2 / (self.width - 1), self.max_dxy_cells * 2 / (self.height - 1),
                self.max_dz_cells * 2 / (self.depth - 1))

    def straight_path_steps(self) -> int:
        """Steps a flow needs to get from z=0 to a plane moving at full speed along z."""
        dz = (self.max_dz_cells or self.depth / 8) * 2 / (self.depth - 1)
        return max(1, math.ceil(1.0 / dz - 1e-9))

    def resolved(self) -> ModelConfig:
        """This config with every None default replaced by its value, validated."""
        validate(self)
        straight = self.straight_path_steps()
        dxy = self.max_dxy_cells or max(1.0, min(self.width, self.height) / 16)
        out = dataclasses.replace(
            self,
            max_dz_cells=float(self.max_dz_cells or self.depth / 8),
            max_dxy_cells=float(dxy),
            max_flows_per_sample=self.max_flows_per_sample or 2 * self.surface,
            min_steps=self.min_steps or straight,
            max_steps=self.max_steps or 4 * straight,
        )
        if out.min_steps > out.max_steps:
            raise ConfigError(f"min_steps={out.min_steps} must be <= max_steps={out.max_steps}")
        if out.max_flows_per_sample < out.surface:
            raise ConfigError(
                f"max_flows_per_sample={out.max_flows_per_sample} is below the {out.surface} flows "
                f"every sample starts with (width x height); allowed range [{out.surface}, 2147483647]")
        return out

    def shape_fields(self) -> dict[str, int]:
        """The fields that fix parameter shapes; checkpoints must agree on all of them."""
        carried = self.carried_fields()
        # embed_dim, then the lattice size, then the rest: the order mismatch messages list them in
        return {"embed_dim": carried.pop("embed_dim"), **{k: getattr(self, k) for k in LATTICE_SIZE_FIELDS},
                **carried}

    def carried_fields(self) -> dict[str, int]:
        """The shape fields other than the lattice's size: what weights carry over between sizes."""
        return {k: getattr(self, k) for k in CARRIED_SHAPE_FIELDS}


# What a config saved before a field existed meant: the model as it was built then. Checkpoints
# from before these fields are rebuilt as the model they are, not as today's defaults.
FIELDS_ADDED_LATER: dict[str, Any] = {
    "collector_rank": lambda saved: saved.get("mapper_rank", 16),
    "energy_update": lambda saved: "replace",
    "plane_split": lambda saved: "arrival",
    "skip": lambda saved: False,
    "mapper_layer_norm": lambda saved: False,
    "split_energy_gain": lambda saved: 0.0,
    "energy_channels": lambda saved: 1,
    "interaction": lambda saved: "none",
    "field_channels": lambda saved: 8,
    "field_resolution": lambda saved: 8,
    "freeze_carrier": lambda saved: False,
}


def saved_model_config(saved: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a saved `asdict(ModelConfig)`, including ones saved by older versions."""
    filled = {k: default(saved) for k, default in FIELDS_ADDED_LATER.items() if k not in saved}
    return from_dict(ModelConfig, {**saved, **filled})


# A preset is a named set of overrides. Large lattices turn on checkpointing and bf16 saved state
# because backprop through every step otherwise keeps steps x N x Hc x L activations.
_BIG = {"activation_checkpointing": True, "saved_state_dtype": "bf16"}
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(width=8, height=8, depth=8, carrier_hidden=32, carrier_layers=1, mapper_rank=8,
                  collector_rank=8, neuron_hidden=16, neuron_features=8),
    "debug": dict(width=20, height=20, depth=10, carrier_hidden=256, carrier_layers=2),
    "experiment": dict(width=28, height=28, depth=60, carrier_hidden=512, carrier_layers=3),
    "optimized": dict(width=100, height=100, depth=50, carrier_hidden=1024, carrier_layers=3, **_BIG),
    # A CPU-sized ladder for the progressive-scaling demo: both share one carrier, so weights carry over.
    "scale-12": dict(width=12, height=12, depth=8, carrier_hidden=64, carrier_layers=1),
    "scale-24": dict(width=24, height=24, depth=12, carrier_hidden=64, carrier_layers=1),
    "scale-50": dict(width=50, height=50, depth=25, carrier_hidden=256, carrier_layers=2),
    "scale-150": dict(width=150, height=150, depth=75, carrier_hidden=256, carrier_layers=2, **_BIG),
    "scale-300": dict(width=300, height=300, depth=150, carrier_hidden=256, carrier_layers=2, **_BIG),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with further field overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(ModelConfig(**PRESETS[name]), overrides)


# ------------------------------------------------------------------------------------------------
# Generic helpers for knob dataclasses (nested dataclass fields are addressed as "outer.inner").
# ------------------------------------------------------------------------------------------------

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def base_type(tp) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of an annotation like `int | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_range(spec: str) -> tuple[float, float, bool, bool]:
    lo, hi = spec[1:-1].split(",")
    return float(lo), float(hi), spec[0] == "[", spec[-1] == "]"


def _check_value(name: str, value: Any, tp, meta: dict) -> None:
    base, optional = base_type(tp)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{name} must not be None")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
        return
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name}={value!r} must be an integer; allowed range {meta.get('range')}")
    if base is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name}={value!r} must be a number; allowed range {meta.get('range')}")
    if base is str and not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a string")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, meta['choices']))}")
    if meta.get("range"):
        lo, hi, lo_closed, hi_closed = _parse_range(meta["range"])
        ok = (value >= lo if lo_closed else value > lo) and (value <= hi if hi_closed else value < hi)
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{name}={value!r} is out of range; allowed range {meta['range']}")


def validate(cfg, prefix: str = "") -> None:
    """Check every field's type and range; raise ConfigError naming the first bad field."""
    hints = _field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, prefix + f.name + ".")
        else:
            _check_value(prefix + f.name, value, hints[f.name], f.metadata)


def field_spec(cfg_cls, key: str) -> tuple[Any, dict]:
    """(type annotation, knob metadata) of a field by dotted path; ConfigError if there is none."""
    cls, name = cfg_cls, key
    while "." in name:
        head, name = name.split(".", 1)
        if head not in _field_types(cls):
            raise ConfigError(f"unknown config field {key!r}")
        cls = _field_types(cls)[head]
    hints = _field_types(cls)
    if name not in hints:
        raise ConfigError(f"unknown config field {key!r}; known fields: {', '.join(sorted(hints))}")
    meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
    return hints[name], dict(meta)


def check_field(cfg_cls, key: str, value: Any) -> None:
    """Raise ConfigError if `value` is not allowed for the field at dotted path `key`."""
    tp, meta = field_spec(cfg_cls, key)
    _check_value(key, value, tp, meta)


def parse_value(cfg_cls, key: str, text: str) -> Any:
    """Turn the text of `--set key=text` into the field's type (`none` means None)."""
    tp, _ = field_spec(cfg_cls, key)
    base, optional = base_type(tp)
    if text.strip().lower() in ("none", "null") and optional:
        return None
    try:
        if base is bool:
            if text.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.strip().lower() in ("true", "1", "yes")
        if base is int:
            return int(float(text)) if float(text).is_integer() else int(text)
        if base is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a valid {base.__name__}") from None
    return text


def apply_overrides(cfg, overrides: dict[str, Any], _prefix: str = ""):
    """A copy of `cfg` with dotted-path overrides applied and validated, e.g. {"model.width": 30}."""
    grouped: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"unknown config field {_prefix + key!r}; known fields: "
                              f"{', '.join(sorted(names))}")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in grouped.items():
        direct[head] = apply_overrides(getattr(cfg, head), sub, _prefix + head + ".")
    out = dataclasses.replace(cfg, **direct)
    validate(out, _prefix)
    return out


def flatten(cfg, prefix: str = "") -> dict[str, Any]:
    """{"dotted.path": value} for every leaf field, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, prefix + f.name + "."))
        else:
            out[prefix + f.name] = value
    return out


def from_dict(cls, data: dict[str, Any]):
    """Rebuild a (nested) knob dataclass from `dataclasses.asdict` output, validating it."""
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config field {key!r} for {cls.__name__}")
        sub = hints[key]
        kwargs[key] = from_dict(sub, value) if dataclasses.is_dataclass(sub) and isinstance(value, dict) else value
    out = cls(**kwargs)
    validate(out)
    return out
