"""Run ``mergekit-yaml`` with a one-token fix for a mergekit 0.1.5 crash on BERT checkpoints.

mergekit 0.1.5's ``MergePlanner.plan_tensor`` evaluates ``[w_in.name] + (w_in.aliases or [])``
for optional weights; aliases are tuples, so every BERT merge (``embeddings.position_ids`` is an
optional weight with aliases) dies with ``TypeError: can only concatenate list (not "tuple") to
list``. This shim wraps the aliases in ``list(...)`` and then runs mergekit's own CLI unchanged.

mergekit 0.1.5 also has no architecture definition for HF ``ViTModel``: it falls back to inferring
one and silently drops every encoder tensor. The shim registers ``mergekit_vit.json`` (a ViT
definition in mergekit's own JSON format, what a free-rider would write) before running.
Usage: ``python -m mergeshield.eval._mergekit_shim CONFIG OUT [mergekit options]``, or
``--serve``: a worker that imports mergekit once (11 s of every 12 s merge of MiniLM, measured)
and then runs one ``mergekit-yaml`` argument list per stdin line (JSON), answering each with one
``@@mergeshield {"ok": ...}`` line on stdout. Before each run it empties mergekit's process-wide
loader cache (keyed by path, so a reused folder would otherwise be read from the previous run's
index); the seed is set by mergekit itself from ``--random-seed`` on every run.
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


REPLY = "@@mergeshield "


def _serve() -> None:
    import json
    import traceback

    from mergekit.io.tasks import LoaderCache
    from mergekit.scripts.run_yaml import main

    for line in sys.stdin:
        args = json.loads(line)
        LoaderCache.loaders.clear()
        try:
            main.main(args=args, prog_name="mergekit-yaml", standalone_mode=False)
            reply: dict[str, object] = {"ok": True}
        except (Exception, SystemExit):  # noqa: BLE001 - every failure goes back to the caller; the worker lives on
            reply = {"ok": False, "error": traceback.format_exc()[-2000:]}
        LoaderCache.loaders.clear()
        sys.stdout.write(REPLY + json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _patch()
    _register_vit()
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        from mergekit.scripts.run_yaml import main

        sys.argv[0] = "mergekit-yaml"
        main()
