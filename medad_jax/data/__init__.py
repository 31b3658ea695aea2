"""MedAD data: record schema, JSONL loader, medad-synth generator, TFDS builders, grain pipeline.

Modules: ``schema`` (records, vocabularies, ``format_question`` / ``format_target``), ``regions`` (the five-region
grid), ``templates`` (question phrasings, options, CoT text), ``loader`` (JSONL directory + validation policy),
``synth`` (medad-synth), ``tfds_builders`` (array_record builders, ``RecordSource``), ``pipeline`` (grain),
``report`` (counts, contact sheet). The CLI is ``python -m medad_jax.data``. TFDS and grain are imported only by
the modules that need them.
"""

from medad_jax.data.regions import REGIONS, region_of
from medad_jax.data.schema import (ANATOMIES, LETTERS, MODALITIES, TASKS, MedADRecord, RecordError, format_question,
                                   format_target, load_image)

__all__ = ['ANATOMIES', 'LETTERS', 'MODALITIES', 'REGIONS', 'TASKS', 'MedADRecord', 'RecordError', 'format_question',
           'format_target', 'load_image', 'region_of']
