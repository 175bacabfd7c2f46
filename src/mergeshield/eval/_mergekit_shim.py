"""Run ``mergekit-yaml`` with a one-token fix for a mergekit 0.1.5 crash on BERT checkpoints.

mergekit 0.1.5's ``MergePlanner.plan_tensor`` evaluates ``[w_in.name] + (w_in.aliases or [])``
for optional weights; aliases are tuples, so every BERT merge (``embeddings.position_ids`` is an
optional weight with aliases) dies with ``TypeError: can only concatenate list (not "tuple") to
list``. This shim wraps the aliases in ``list(...)`` and then runs mergekit's own CLI unchanged.
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


if __name__ == "__main__":
    _patch()
    from mergekit.scripts.run_yaml import main

    sys.argv[0] = "mergekit-yaml"
    main()
