"""The registry of architecture families: one YAML file each under ``families/``."""

from __future__ import annotations

import fnmatch
from functools import cache
from importlib import resources

import yaml
from pydantic import ValidationError

from mergeshield.errors import SpecError, UnsupportedArchitectureError
from mergeshield.symmetry.spec import FamilySpec

__all__ = ["list_families", "get_family", "family_for_model_type", "load_family_file"]


def load_family_file(text: str, source: str = "<string>") -> FamilySpec:
    """Parse and strictly validate one family description (YAML text).

    Raises:
        SpecError: the YAML is malformed or does not follow the schema (unknown fields included).
    """
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # PyYAML raises the latter two too
        raise SpecError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, found {type(data).__name__}")
    try:
        return FamilySpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{source}: invalid symmetry description:\n{exc}") from None


@cache
def _families() -> dict[str, FamilySpec]:
    out: dict[str, FamilySpec] = {}
    root = resources.files("mergeshield.symmetry") / "families"
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            spec = load_family_file(entry.read_text(encoding="utf-8"), entry.name)
            out[spec.name] = spec
    return out


def list_families(pattern: str = "*") -> list[str]:
    """Names of the registered families matching a wildcard pattern, e.g. ``list_families('l*')``."""
    return sorted(n for n in _families() if fnmatch.fnmatchcase(n, pattern))


def get_family(name: str) -> FamilySpec:
    """The family description called `name`."""
    try:
        return _families()[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"no family {name!r}; registered: {list_families()}"
        ) from None


def family_for_model_type(model_type: str) -> FamilySpec:
    """The family that describes checkpoints whose config says ``model_type``.

    Raises:
        UnsupportedArchitectureError: no family lists it; the message lists the supported types.
    """
    for spec in _families().values():
        if model_type in spec.model_types:
            return spec
    supported = sorted(t for s in _families().values() for t in s.model_types)
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported: no symmetry description lists it. "
        f"Supported model types: {supported}. To add one, write a family file under "
        "src/mergeshield/symmetry/families/ (copy the closest one; see README, "
        "'Adding an architecture') and add a tiny config for it to tests/conftest.py."
    )
