"""Evaluation suites: real models, real data, every merge method, attacks, reports."""
