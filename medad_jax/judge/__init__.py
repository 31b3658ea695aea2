"""The consistency judge ``F(T, Q)`` of Con-GRPO (paper Eq. 6) behind one batched interface.

    judge = make_judge(JudgeConfig(backend='sglang', url='http://judge:30000'), local_scorer=None)
    future = judge.submit(questions, thoughts)   # returns at once; overlap device work here
    letters = future.result().letters            # one verdict letter per rollout

Backends: ``sglang`` (native ``/generate``), ``openai`` (``/v1/chat/completions``), ``local`` (an in-process
Flax LMM scoring the letters' next-token log-probs; the default) and ``rule`` (deterministic extraction).

``JudgeConfig.con_mode='evidence'`` switches every backend to the evidence-aware verdict (five rubric parts and the
deduced letter, ``result.evidence``; :mod:`medad_jax.judge.evidence`).
"""

from __future__ import annotations

import dataclasses

from medad_jax.judge.base import (BACKENDS, Judge, JudgeConfig, JudgeError, JudgeMetrics, JudgeRequestError,
                                  JudgeResult, JudgeUnavailableError)
from medad_jax.judge.remote import OpenAIJudge, SGLangJudge
from medad_jax.judge.local import LetterScorer, LocalJudge, RuleJudge, extract_conclusion
from medad_jax.judge.prompt import (SYSTEM_PROMPT, build_judge_messages, build_judge_prompt, parse_options,
                                    split_judge_prompt)

__all__ = [
    'BACKENDS', 'Judge', 'JudgeConfig', 'JudgeError', 'JudgeMetrics', 'JudgeRequestError', 'JudgeResult',
    'JudgeUnavailableError', 'LetterScorer', 'LocalJudge', 'OpenAIJudge', 'RuleJudge', 'SGLangJudge',
    'SYSTEM_PROMPT', 'build_judge_messages', 'build_judge_prompt', 'extract_conclusion', 'make_judge',
    'parse_options', 'split_judge_prompt',
]


def make_judge(cfg: JudgeConfig, local_scorer: LetterScorer | None = None,
               metrics: JudgeMetrics | None = None) -> Judge:
  """The judge ``cfg`` describes.

  ``local_scorer`` is required for ``backend='local'`` and for ``on_failure='fallback_local'``. The network
  judge counts what it hands over (``fallback_items``, ``fallback_calls``); the fallback judge keeps its own
  counters in ``judge.fallback.metrics``.
  """
  metrics = metrics if metrics is not None else JudgeMetrics()
  if cfg.backend == 'rule':
    return RuleJudge(cfg, metrics)
  if cfg.backend == 'local':
    if local_scorer is None:
      raise ValueError("JudgeConfig.backend='local' needs local_scorer (score_letters(prompts, letters) -> [N, K])")
    return LocalJudge(cfg, local_scorer, metrics)
  fallback = None
  if cfg.on_failure == 'fallback_local':
    if local_scorer is None:
      raise ValueError("JudgeConfig.on_failure='fallback_local' needs local_scorer for the fallback judge")
    fallback = LocalJudge(dataclasses.replace(cfg, backend='local', on_failure='raise'), local_scorer, JudgeMetrics())
  cls = SGLangJudge if cfg.backend == 'sglang' else OpenAIJudge
  return cls(cfg, fallback, metrics)
