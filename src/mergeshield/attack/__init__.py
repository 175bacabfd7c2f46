"""Adaptive attacks on protected checkpoints (the free-rider's side), to measure robustness."""

from mergeshield.attack.realign import ATTACKS, AttackReport, attack, recovery

__all__ = ["ATTACKS", "AttackReport", "attack", "recovery"]
