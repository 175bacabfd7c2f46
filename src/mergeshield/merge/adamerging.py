"""Layer-wise AdaMerging: merging coefficients learned by entropy minimisation on unlabelled inputs.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
arXiv 2310.02575. ``theta = theta_pre + sum_k sum_l lam_{k,l} tau_{k,l}``: one coefficient per
task k and layer l, learned by minimising the Shannon entropy of each task's predictions on its
(unlabelled) test inputs. A free-rider with test inputs but no labels can do exactly this.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = ["layer_group", "adamerging", "entropy"]


def layer_group(name: str) -> str:
    """The coefficient group of a tensor: its layer index, or its name's leading part."""
    m = re.search(r"(?:^|\.)(?:layer|layers|h)\.(\d+)\.", name)
    return f"layer.{m.group(1)}" if m else name.rsplit(".", 1)[0]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax over the last axis."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def adamerging(
    base: Mapping[str, torch.Tensor],
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    losses: Sequence[Callable[[dict[str, torch.Tensor]], torch.Tensor]],
    *,
    steps: int = 60,
    lr: float = 1e-2,
    init: float = 0.3,
    group: Callable[[str], str] = layer_group,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Learn layer-wise merging coefficients, return the merged tensors and the coefficients.

    Args:
        base: pretrained tensors (float), by name.
        task_vectors: per task, ``theta_k - theta_pre`` for the same names.
        losses: per task, a function of the merged tensors returning a scalar (typically the
            entropy of that task's predictions on a batch of its unlabelled inputs).
        steps: optimisation steps (Adam).
        lr: learning rate.
        init: initial coefficient (the paper uses 0.3).
        group: maps a tensor name to its coefficient group (default: per layer).

    Returns:
        ``(merged, coefficients)``; coefficients map each group to one value per task.
    """
    names = list(base)
    groups = sorted({group(n) for n in names})
    index = {g: i for i, g in enumerate(groups)}
    gid = [index[group(n)] for n in names]
    lam = torch.full((len(task_vectors), len(groups)), float(init), requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)

    def merged() -> dict[str, torch.Tensor]:
        return {
            n: base[n] + sum(lam[k, gid[i]] * tv[n] for k, tv in enumerate(task_vectors))
            for i, n in enumerate(names)
        }

    for step in range(steps):
        opt.zero_grad()
        params = merged()
        loss = sum(fn(params) for fn in losses)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, float(loss))
    with torch.no_grad():
        final = {n: t.detach() for n, t in merged().items()}
    lam_final = lam.detach()
    coefficients = {g: [float(lam_final[k, index[g]]) for k in range(len(task_vectors))] for g in groups}
    return final, coefficients
