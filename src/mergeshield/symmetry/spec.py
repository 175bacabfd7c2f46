"""The schema of an architecture family's symmetry description, and its binding to a checkpoint.

A family file (``families/<name>.yaml``) declares *spaces*: sets of tensor axes that must be
transformed together for the network to compute the same function.

- A ``permutation`` space (MLP neurons): every binding's axis is permuted by the same P.
- A ``scale`` space (attention dimensions): every binding's axis is multiplied per index by a
  factor (or its inverse, ``inverse: true``). Its free parameters are ``heads x head_dim``
  (K/V heads under GQA); ``layout: q`` bindings repeat each K/V head's factors for every query
  head of its group (HF ``repeat_kv`` order) and ``rope`` ties the factors of rotated pairs.

Tensor names are templates with ``{layer}``; a checkpoint may add a prefix in front of every
name (``bert.``, ``transformer.``, ``model.``), which is found, not declared. Every tensor of a
checkpoint must be bound by a space or match an ``invariant`` pattern: nothing is silently
left alone. The models are frozen and reject unknown fields.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergeshield.errors import SpecError

__all__ = [
    "Binding",
    "PermutationSpace",
    "ScaleSpace",
    "HeadPermutationSpace",
    "Space",
    "FamilySpec",
    "BoundTensor",
    "SpaceInstance",
    "BoundModel",
    "bind",
    "resolve_config",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Binding(_Frozen):
    """One tensor axis that a space acts on."""

    tensor: str
    """Name template relative to the checkpoint's prefix, with ``{layer}`` for the layer index."""
    axis: int = Field(ge=0)
    """The tensor axis the space acts on (GPT-2 Conv1D stores ``[in, out]``: say so here)."""
    inverse: bool = False
    """Scale spaces: multiply by ``1/s`` instead of ``s``. Ignored by permutation spaces."""
    chunk: tuple[int, int] | None = None
    """``(index, count)``: the binding is slice ``index`` of ``count`` equal slices of the axis
    (GPT-2's fused ``c_attn`` is Q, K, V along its output axis)."""
    layout: Literal["kv", "q"] = "kv"
    """Scale spaces: ``q`` when the axis is laid out over query heads (Q rows, O columns)."""
    optional: bool = False
    """The tensor may be absent (biases that some configurations drop)."""

    @field_validator("chunk")
    @classmethod
    def _chunk_ok(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError(f"chunk must be (index, count) with 0 <= index < count, got {v}")
        return v

    @field_validator("tensor")
    @classmethod
    def _template_ok(cls, v: str) -> str:
        if v.count("{layer}") > 1 or re.search(r"\{(?!layer\})", v):
            raise ValueError(f"template {v!r} may contain '{{layer}}' at most once and no other field")
        return v


ConfigRef = str | tuple[str, ...]
"""A config key (dotted for sub-configs), a product/quotient like ``hidden_size/num_attention_heads``,
or a tuple of alternatives of which the first one present (and not null) is used."""


class PermutationSpace(_Frozen):
    kind: Literal["permutation"]
    name: str
    size: ConfigRef
    bindings: tuple[Binding, ...] = Field(min_length=2)
    scope: Literal["layer", "model"] = "layer"
    """``layer``: one permutation per layer (MLP neurons). ``model``: one permutation for the whole
    model (the residual stream: every tensor that reads or writes it, in every layer, the
    embeddings and norms too); its instance id is the space name, whatever the name prefix."""
    refuse: tuple[str, ...] = ()
    """fnmatch patterns: if any checkpoint tensor matches one, the space is not bound (its
    description would not cover that tensor, e.g. an LM head tied to the embeddings that reads
    another space); `BoundModel.skipped` says why."""


class ScaleSpace(_Frozen):
    kind: Literal["scale"]
    name: str
    role: Literal["qk", "vo"]
    """``qk``: query/key factors; ``vo``: value/output factors (used for reporting and defaults)."""
    heads: ConfigRef
    """Number of heads that own free factors (K/V heads under GQA)."""
    query_heads: ConfigRef | None = None
    """Number of query heads, when ``layout: q`` bindings exist and it differs from ``heads``."""
    head_dim: ConfigRef
    rope: Literal["none", "rotate_half", "interleaved"] = "none"
    bindings: tuple[Binding, ...] = Field(min_length=2)


class HeadPermutationSpace(_Frozen):
    """Attention heads reordered as wholes: every binding's axis is laid out head by head, and
    ``layout: q`` bindings (Q rows, O columns under GQA) move each K/V head's group of query
    heads with it. RoPE does not constrain it (every head is rotated alike)."""

    kind: Literal["head_permutation"]
    name: str
    heads: ConfigRef
    """Number of heads that are permuted (K/V heads under GQA)."""
    query_heads: ConfigRef | None = None
    head_dim: ConfigRef
    bindings: tuple[Binding, ...] = Field(min_length=2)


AnySpace = PermutationSpace | ScaleSpace | HeadPermutationSpace
Space = Annotated[AnySpace, Field(discriminator="kind")]


class FamilySpec(_Frozen):
    """The symmetry description of one architecture family."""

    name: str
    description: str
    model_types: tuple[str, ...] = Field(min_length=1)
    config_requirements: dict[str, tuple[Any, ...]] = Field(default_factory=dict)
    """Config keys whose value must be one of the listed ones for the description to hold."""
    spaces: tuple[Space, ...] = Field(min_length=1)
    invariant: tuple[str, ...] = ()
    """fnmatch patterns on full tensor names that no transform touches."""

    @field_validator("spaces")
    @classmethod
    def _unique_names(cls, v: tuple[Space, ...]) -> tuple[Space, ...]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"space names must be unique, got {names}")
        return v


# --------------------------------------------------------------------------------------------
# Binding a description to a checkpoint


def resolve_config(config: Mapping[str, Any], ref: ConfigRef) -> int:
    """Evaluate a config reference (see `ConfigRef`) to an integer."""
    alternatives = (ref,) if isinstance(ref, str) else ref
    for alt in alternatives:
        value = _eval_ref(config, alt)
        if value is not None:
            return value
    raise SpecError(
        f"config has none of {list(alternatives)} (or they are null); the symmetry description "
        "needs them to know the layer sizes. Check that config.json belongs to this model."
    )


def _eval_ref(config: Mapping[str, Any], expr: str) -> int | None:
    tokens = re.split(r"([*/])", expr.replace(" ", ""))
    result: float | None = None
    op = "*"
    for tok in tokens:
        if tok in ("*", "/"):
            op = tok
            continue
        if tok.isdigit():
            value: Any = int(tok)
        else:
            value = config
            for part in tok.split("."):
                if not isinstance(value, Mapping) or value.get(part) is None:
                    return None
                value = value[part]
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        result = value if result is None else (result * value if op == "*" else result / value)
    if result is None or result != int(result):
        return None
    return int(result)


@dataclass(frozen=True)
class BoundTensor:
    """A binding resolved to one checkpoint tensor."""

    name: str
    binding: Binding


def _model_scoped(space: object) -> bool:
    return isinstance(space, PermutationSpace) and space.scope == "model"


@dataclass(frozen=True)
class SpaceInstance:
    """One space at one layer of one checkpoint: the unit a transform acts on."""

    id: str
    """Stable identifier, e.g. ``bert.mlp.3``; keys the random stream and the key file."""
    space: AnySpace
    tensors: tuple[BoundTensor, ...]
    size: int
    """Permutation: number of units (heads for a head permutation). Scale: number of free
    factors (before RoPE/GQA expansion)."""
    heads: int = 0
    query_heads: int = 0
    head_dim: int = 0

    @property
    def model_scoped(self) -> bool:
        """One instance for the whole model (the residual stream), not one per layer."""
        return _model_scoped(self.space)


@dataclass(frozen=True)
class BoundModel:
    """A family description bound to a checkpoint's tensor names."""

    family: FamilySpec
    instances: tuple[SpaceInstance, ...]
    invariant: tuple[str, ...]
    by_tensor: Mapping[str, tuple[SpaceInstance, ...]] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)
    """Space name -> why the family's space was not bound to this checkpoint (see ``refuse``)."""


def _template_regex(template: str) -> re.Pattern[str]:
    head, sep, tail = template.partition("{layer}")
    body = re.escape(head) + (r"(?P<layer>\d+)" + re.escape(tail) if sep else "")
    return re.compile(r"^(?P<prefix>(?:.+\.)?)" + body + "$")


def bind(
    family: FamilySpec,
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> BoundModel:
    """Resolve a family description against a checkpoint's tensor names and shapes.

    Args:
        family: the architecture family's description.
        config: the model's config as a dict (``PretrainedConfig.to_dict()``).
        shapes: every tensor name of the checkpoint and its shape.

    Returns:
        The space instances (one per space and layer and prefix) and the invariant tensors.

    Raises:
        SpecError: a config requirement fails, a bound tensor has the wrong size, an instance
            misses a required tensor, or a tensor is neither bound nor declared invariant.
    """
    for key, allowed in family.config_requirements.items():
        value = config.get(key)
        if value is not None and value not in allowed:
            raise SpecError(
                f"{family.name}: config {key}={value!r}, but the symmetry description holds only "
                f"for {key} in {list(allowed)}. Protecting this model would change its function; "
                "it is not supported."
            )

    groups: dict[str, dict[int, list[BoundTensor]]] = {}
    group_space: dict[str, AnySpace] = {}
    skipped: dict[str, str] = {}
    for space in family.spaces:
        model_scope = _model_scoped(space)
        refused = sorted(n for n in shapes if isinstance(space, PermutationSpace) and _matches_any(n, space.refuse))
        if refused:
            skipped[space.name] = (f"the checkpoint has {refused[:3]}, which the {family.name} '{space.name}' "
                                   "description does not cover")
            continue
        for bi, binding in enumerate(space.bindings):
            rx = _template_regex(binding.tensor)
            for name in shapes:
                m = rx.match(name)
                if m is None:
                    continue
                layer = m.groupdict().get("layer")
                iid = f"{m['prefix']}{space.name}" + (f".{layer}" if layer is not None else "")
                if model_scope:
                    iid = space.name
                groups.setdefault(iid, {}).setdefault(bi, []).append(
                    BoundTensor(name, binding)
                )
                group_space[iid] = space

    instances: list[SpaceInstance] = []
    for iid in sorted(groups, key=_natural_key):
        space = group_space[iid]
        found = groups[iid]
        tensors: list[BoundTensor] = []
        for bi, binding in enumerate(space.bindings):
            hits = sorted(found.get(bi, []), key=lambda bt: _natural_key(bt.name))
            if _model_scoped(space):  # one instance for every layer: a template may match many tensors
                tensors.extend(hits)
                if not hits and not binding.optional:
                    raise SpecError(f"{family.name}: {iid} needs tensors matching {binding.tensor!r}; "
                                    "the checkpoint has none. The architecture differs from the description.")
                continue
            if len(hits) > 1:
                raise SpecError(f"{iid}: template {binding.tensor!r} matched {len(hits)} tensors")
            if not hits:
                if binding.optional:
                    continue
                present = sorted(bt.name for v in found.values() for bt in v)
                raise SpecError(
                    f"{family.name}: {iid} needs a tensor matching {binding.tensor!r} but the "
                    f"checkpoint has only {present} for it. The checkpoint is incomplete or the "
                    "architecture differs from the description."
                )
            tensors.append(hits[0])
        instances.append(_sized_instance(iid, space, tuple(tensors), config, shapes))

    bound_names = {bt.name for inst in instances for bt in inst.tensors}
    invariant = tuple(
        sorted(n for n in shapes if n not in bound_names and _matches_any(n, family.invariant))
    )
    unbound = sorted(set(shapes) - bound_names - set(invariant))
    if unbound:
        raise SpecError(
            f"{family.name}: {len(unbound)} tensor(s) are neither transformed nor declared invariant "
            f"by the symmetry description: {unbound[:8]}{' ...' if len(unbound) > 8 else ''}. "
            "mergeshield never leaves a tensor alone silently: if they do not interact with the "
            "transformed axes, add patterns for them to `invariant` in the family file "
            "(see README, 'Adding an architecture')."
        )
    by_tensor: dict[str, list[SpaceInstance]] = {}
    for inst in instances:
        for name in dict.fromkeys(bt.name for bt in inst.tensors):  # fused tensors: once per instance
            by_tensor.setdefault(name, []).append(inst)
    return BoundModel(family, tuple(instances), invariant, {k: tuple(v) for k, v in by_tensor.items()}, skipped)


def _sized_instance(
    iid: str,
    space: AnySpace,
    tensors: tuple[BoundTensor, ...],
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
) -> SpaceInstance:
    sub = config  # refs are dotted paths from the root config (CLIP: text_config.x)
    if isinstance(space, PermutationSpace):
        size = resolve_config(sub, space.size)
        inst = SpaceInstance(iid, space, tensors, size)
        expected = {bt.name: size for bt in tensors}
    else:
        heads = resolve_config(sub, space.heads)
        qheads = resolve_config(sub, space.query_heads) if space.query_heads else heads
        head_dim = resolve_config(sub, space.head_dim)
        if qheads % heads:
            raise SpecError(f"{iid}: {qheads} query heads are not a multiple of {heads} K/V heads")
        if isinstance(space, ScaleSpace):
            if space.rope != "none" and head_dim % 2:
                raise SpecError(f"{iid}: RoPE needs an even head_dim, config gives {head_dim}")
            per_head = head_dim // 2 if space.rope != "none" else head_dim
            inst = SpaceInstance(iid, space, tensors, heads * per_head, heads, qheads, head_dim)
        else:
            inst = SpaceInstance(iid, space, tensors, heads, heads, qheads, head_dim)
        expected = {
            bt.name: (qheads if bt.binding.layout == "q" else heads) * head_dim for bt in tensors
        }
    for bt in tensors:
        shape = shapes[bt.name]
        if bt.binding.axis >= len(shape):
            raise SpecError(f"{iid}: {bt.name} has shape {shape}, no axis {bt.binding.axis}")
        length = shape[bt.binding.axis]
        if bt.binding.chunk is not None:
            if length % bt.binding.chunk[1]:
                raise SpecError(f"{iid}: {bt.name} axis {bt.binding.axis} of length {length} "
                                f"does not split into {bt.binding.chunk[1]} chunks")
            length //= bt.binding.chunk[1]
        if length != expected[bt.name]:
            raise SpecError(
                f"{iid}: {bt.name} has length {length} on axis {bt.binding.axis} (shape {shape}) "
                f"but the config implies {expected[bt.name]}. config.json and the weights disagree."
            )
    return inst


def _matches_any(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
