"""Run ``mergekit-yaml`` with a one-token fix for a mergekit 0.1.5 crash on BERT checkpoints.

mergekit 0.1.5's ``MergePlanner.plan_tensor`` evaluates ``[w_in.name] + (w_in.aliases or [])``
for optional weights; aliases are tuples, so every BERT merge (``embeddings.position_ids`` is an
optional weight with aliases) dies with ``TypeError: can only concatenate list (not "tuple") to
list``. This shim wraps the aliases in ``list(...)`` and then runs mergekit's own CLI unchanged.

mergekit 0.1.5 also has no architecture definition for HF ``ViTModel``: it falls back to inferring
one and silently drops every encoder tensor. The shim registers ``mergekit_vit.json`` (a ViT
definition in mergekit's own JSON format, what a free-rider would write) before running.
Usage: ``python -m mergeshield.eval._mergekit_shim CONFIG OUT [mergekit options]``.
"""

from __future__ import annotations

import inspect
import sys
import textwrap


def _patch() -> None:
    import mergekit.plan as plan

    src = textwrap.dedent(inspect.getsource(plan.MergePlanner.plan_tensor))
    fixed = src.replace("[w_in.name] + (w_in.aliases or [])", "[w_in.name] + list(w_in.aliases or [])")
    if fixed != src:
        namespace: dict[str, object] = {}
        exec(compile(fixed, plan.__file__, "exec"), plan.__dict__, namespace)  # noqa: S102
        plan.MergePlanner.plan_tensor = namespace["plan_tensor"]  # type: ignore[method-assign]


def _register_vit() -> None:
    from importlib.resources import files

    from mergekit.architecture import json_definitions as jd

    arch = jd._load_architecture_json((files("mergeshield.eval") / "mergekit_vit.json").read_text())
    for name in arch.architectures:
        jd.NAME_TO_ARCH.setdefault(name, []).append(arch)  # the same dict mergekit.architecture looks in


if __name__ == "__main__":
    _patch()
    _register_vit()
    from mergekit.scripts.run_yaml import main

    sys.argv[0] = "mergekit-yaml"
    main()
