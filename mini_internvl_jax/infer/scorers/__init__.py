"""Benchmark scorers, one small module per benchmark family, and the task registry (`tasks`).

Each module's docstring names the reference scoring code it follows (the benchmark's official
script, VLMEvalKit, or InternVL's `eval/` folder) and where those references disagree. The
scorers are pure functions of (prediction text, reference fields); `tasks.py` ties each
benchmark to its prompt, generation length, input formats and scorer.
"""
