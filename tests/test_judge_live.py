"""Integration against a real SGLang server: runs only when MEDAD_SGLANG_URL points at one, e.g.

    launch/judge_sglang.sh --model Qwen/Qwen2.5-7B-Instruct -- python3 -m pytest -q tests/test_judge_live.py

The protocol is checked for any served model; the verdicts are compared with the rule judge only when
MEDAD_SGLANG_STRICT=1 (a capable instruct judge), since a tiny or random model has no reason to agree.
"""

import os

import httpx
import pytest

from medad_jax.judge import JudgeConfig, RuleJudge, make_judge

URL = os.environ.get('MEDAD_SGLANG_URL', '')
QUESTION = 'Which organ is shown in this CT slice?\nA. Brain\nB. Liver\nC. Lung\nD. Skin'
THOUGHTS = [
    'A large homogeneous solid organ lies under the right hemidiaphragm with portal triads. The answer is B.',
    'Air-filled parenchyma with bronchovascular markings and lobar fissures. Therefore the answer is C.',
    'Gyri, sulci and ventricles are visible. So the answer is A.',
    'Stratified epidermis over dermis with hair follicles. The answer is D.',
]


@pytest.fixture(scope='module')
def url():
  if not URL:
    pytest.skip('MEDAD_SGLANG_URL is not set: no real SGLang judge server to test against '
                '(start one with launch/judge_sglang.sh)')
  r = httpx.get(f'{URL}/health', timeout=10)
  assert r.status_code == 200, f'{URL}/health answered {r.status_code}'
  return URL


@pytest.mark.parametrize('backend', ['sglang', 'openai'])
def test_live_judge(url, backend):
  model = httpx.get(f'{url}/model_info', timeout=10).json().get('served_model_name', 'default')
  cfg = JudgeConfig(backend=backend, url=url, model=model, timeout_s=60, deadline_s=300, max_batch=2)
  judge = make_judge(cfg)
  res = judge.judge([QUESTION] * len(THOUGHTS), THOUGHTS)
  judge.close()
  assert all(v in cfg.letters for v in res.letters) and not any(res.fallback)
  assert judge.metrics['failed_items'] == 0 and judge.metrics['invalid_verdicts'] == 0
  if os.environ.get('MEDAD_SGLANG_STRICT') == '1':
    assert res.letters == RuleJudge().judge([QUESTION] * len(THOUGHTS), THOUGHTS).letters
