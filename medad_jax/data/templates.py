"""Question templates (10 phrasings per task, paper §3.1), four-option construction, and grounded CoT text.

Options are built from the correct answer plus three distractors drawn from the task's label pool, with
look-alike labels (e.g. MRI vs CE-MRI, Lung vs Chest) weighted up so the distractors are plausible. The caller
chooses which letter holds the correct answer (``medad-synth`` balances letters per split and task).

CoT text is built from the facts that were drawn into the image (see ``synth``): it names the visual evidence
and reasons to the option text and letter, in one to three sentences.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medad_jax.data.regions import REGIONS
from medad_jax.data.schema import ANATOMIES, LETTERS, MODALITIES, TASKS

PATHOLOGIES: tuple[str, ...] = ('Mass', 'Cyst', 'Nodule', 'Calcification', 'Infiltrate')
NO_ABNORMALITY = 'No abnormality'
NO_LESION = 'No lesion'
ABNORMAL_YES = 'Yes, an abnormality is present'
ABNORMAL_NO = 'No, the image appears normal'
ANOMALY_FILLERS: tuple[str, ...] = ('Cannot be determined from this image', 'Only an imaging artifact is present',
                                    'The image quality is insufficient to judge')

QUESTIONS: dict[str, tuple[str, ...]] = {
    'anatomy_identification': (
        'Which anatomical structure is shown in this image?',
        'What organ or body region does this image depict?',
        'Identify the anatomy visible in this medical image.',
        'Which part of the body is being imaged here?',
        'What is the primary anatomical region captured in this scan?',
        'Which organ is the focus of this image?',
        'From which anatomical site was this image acquired?',
        'What body structure can be recognized in this picture?',
        'Determine the anatomical region displayed in this image.',
        'This image most likely shows which anatomy?',
    ),
    'modality_classification': (
        'What imaging modality was used to acquire this image?',
        'Which imaging technique produced this image?',
        'Identify the modality of this medical image.',
        'By what type of imaging was this picture obtained?',
        'Which acquisition modality does this image come from?',
        'What kind of medical imaging is shown here?',
        'Classify the imaging modality of this scan.',
        'Which imaging method best describes this image?',
        'This image was most likely captured with which modality?',
        'Determine the imaging technology used for this picture.',
    ),
    'anomaly_detection': (
        'Is there any abnormality in this image?',
        'Does this image show signs of an anomaly?',
        'Are there any abnormal findings visible here?',
        'Is this image normal, or does it contain a lesion?',
        'Can you detect any pathological finding in this image?',
        'Does the tissue in this image look abnormal?',
        'Is an anomaly present in this medical image?',
        'Based on the image, is there evidence of disease?',
        'Would you classify this image as normal or abnormal?',
        'Is any lesion or abnormal region visible?',
    ),
    'pathology_characterization': (
        'What type of abnormality is seen in this image?',
        'How would you characterize the finding in this image?',
        'Which pathology best describes the visible lesion, if any?',
        'What is the nature of the abnormal region, if any?',
        'Identify the kind of lesion shown in this image.',
        'Which description fits the finding in this image?',
        'What pathological pattern is present here?',
        'Classify the abnormality visible in this image.',
        'What kind of lesion, if any, does this image contain?',
        'Which finding best characterizes this image?',
    ),
    'lesion_localization': (
        'Where is the lesion located in this image?',
        'In which region of the image is the abnormality found?',
        'Which part of the image contains the lesion?',
        'Locate the abnormal finding in this image.',
        'Where in the image does the anomaly appear?',
        'Which region of the five-region grid holds the lesion?',
        'What is the position of the lesion in this image?',
        'In which area of the image is the pathology visible?',
        'Identify the location of the abnormal region.',
        'Where would you place the lesion on this image?',
    ),
}

# Look-alike labels: drawn as distractors four times as often as the rest.
_CONFUSABLE: dict[str, tuple[str, ...]] = {
    'MRI': ('CE-MRI', 'CT', 'X-ray'), 'CT': ('MRI', 'X-ray', 'CE-MRI'), 'OCT': ('Ultrasound', 'Fundus', 'Microscopy'),
    'Ultrasound': ('OCT', 'CT', 'MRI'), 'Dermoscopy': ('Endoscopy', 'Microscopy', 'Fundus'),
    'CE-MRI': ('MRI', 'CT'), 'Endoscopy': ('Dermoscopy', 'Fundus'), 'Fundus': ('OCT', 'Endoscopy', 'Dermoscopy'),
    'X-ray': ('CT', 'MRI'), 'Microscopy': ('Dermoscopy', 'Endoscopy'),
    'Brain': ('Thyroid', 'Lung'), 'Liver': ('Lung', 'Alimentary', 'Chest'), 'Retina': ('Brain', 'Skin'),
    'Breast': ('Thyroid', 'Chest', 'Lymph Node'), 'Skin': ('Breast', 'Retina'), 'Lung': ('Chest', 'Liver'),
    'Thyroid': ('Breast', 'Lymph Node'), 'Alimentary': ('Liver', 'Lymph Node'), 'Chest': ('Lung', 'Breast'),
    'Lymph Node': ('Breast', 'Thyroid'),
    'Mass': ('Nodule', 'Infiltrate'), 'Cyst': ('Nodule', 'Mass'), 'Nodule': ('Mass', 'Calcification', 'Cyst'),
    'Calcification': ('Nodule',), 'Infiltrate': ('Mass',),
}


def distractor_pool(task: str, correct: str) -> tuple[str, ...]:
  """Every wrong label the task can offer next to ``correct``."""
  if task == 'modality_classification':
    pool = MODALITIES
  elif task == 'anatomy_identification':
    pool = ANATOMIES
  elif task == 'anomaly_detection':
    # The opposite verdict is always offered; the fillers make up the other two.
    return tuple([ABNORMAL_NO if correct == ABNORMAL_YES else ABNORMAL_YES] + list(ANOMALY_FILLERS))
  elif task == 'pathology_characterization':
    pool = PATHOLOGIES + (NO_ABNORMALITY,)
  elif task == 'lesion_localization':
    pool = REGIONS + (NO_LESION,)
  else:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  return tuple(p for p in pool if p != correct)


def make_options(rng: np.random.Generator, task: str, correct: str, letter: str) -> tuple[str, str, str, str]:
  """Four distinct options with ``correct`` at ``letter`` and three plausible distractors elsewhere."""
  pool = distractor_pool(task, correct)
  if correct in pool or len(pool) < 3:
    raise ValueError(f'cannot build options for {task!r} with correct answer {correct!r}')
  if task == 'anomaly_detection':
    opposite, fillers = pool[0], list(pool[1:])
    picked = [opposite] + [fillers[i] for i in rng.choice(len(fillers), 2, replace=False)]
  else:
    w = np.array([4.0 if p in _CONFUSABLE.get(correct, ()) else 1.0 for p in pool])
    picked = [pool[i] for i in rng.choice(len(pool), 3, replace=False, p=w / w.sum())]
  picked = [picked[i] for i in rng.permutation(3)]
  picked.insert(LETTERS.index(letter), correct)
  return tuple(picked)


# ---------------------------------------------------------------------------------------------- CoT text

MODALITY_EVIDENCE: dict[str, tuple[str, ...]] = {
    'MRI': ('a smooth, low-noise greyscale slice on a noisy black background with a gentle brightness gradient',
            'soft grey-level contrast with no scanner frame and a faint shading from one side to the other'),
    'CT': ('a greyscale slice inside a sharp circular field of view with a bright table line beneath it',
           'fine-grained noise within a crisp circular frame and a horizontal table bar at the bottom'),
    'OCT': ('bright, horizontally streaked speckle confined to a horizontal band with dark margins above and below',
            'a wide band of layered, streaky speckle between dark upper and lower borders'),
    'Ultrasound': ('a fan-shaped field of view opening downward from the top, filled with granular speckle',
                   'coarse speckle texture inside a sector-shaped window with black corners at the top'),
    'Dermoscopy': ('skin-toned colour with a dark circular vignette and a few thin dark hairs',
                   'beige-pink surface colour, hair strands and darkened corners from the contact lens'),
    'CE-MRI': ('a high-contrast greyscale slice with bright enhancing vessels and black bars at the left and right',
               'strongly enhanced bright vessel lines in a greyscale slice framed by vertical black side bars'),
    'Endoscopy': ('pink-red mucosa seen through an octagonal black frame with white specular highlights',
                  'glistening red-pink tissue with bright light reflections inside an eight-sided black mask'),
    'Fundus': ('an orange-red circular disc on a black background',
               'a round orange-red field of view surrounded by black, as seen through the pupil'),
    'X-ray': ('a full-frame projection with bright dense structures and a small bright marker at the top left',
              'a smooth, low-noise projection image filling the whole frame and a bright corner marker'),
    'Microscopy': ('a pale pink background scattered with many small purple nuclei, as in an H&E-stained slide',
                   'numerous small purple dots on pink stained tissue, the look of a stained slide'),
}
ANATOMY_EVIDENCE: dict[str, tuple[str, ...]] = {
    'Brain': ('an oval outline with a bright rim and a dark vertical midline dividing two folded halves',
              'a tall oval with a bright skull-like rim, folded texture and a central dividing line'),
    'Liver': ('a large wedge-shaped organ extending from the left side with a few dark vessel dots',
              'a big tapering wedge of tissue on the left, dotted with small dark vessels'),
    'Retina': ('a round disc with a bright optic disc on one side and curving dark vessels',
               'a circular field with a small bright spot from which arching vessels run'),
    'Breast': ('a dome-shaped region hanging from the top edge with streaky internal tissue',
               'a rounded dome descending from the top border, filled with fibrous streaks'),
    'Skin': ('textured tissue filling the whole field with fine criss-cross creases',
             'a uniform surface over the entire image with a fine crossing crease pattern'),
    'Lung': ('two tall oval fields side by side',
             'a pair of vertical oval lobes to the left and right of the midline'),
    'Thyroid': ('a butterfly shape: two small lobes joined by a thin central isthmus around a dark ring',
                'two small paired lobes bridged by a narrow isthmus over a dark circular airway'),
    'Alimentary': ('a thick ring-shaped wall with radial folds around a dark central lumen',
                   'a dark central lumen encircled by a folded tubular wall'),
    'Chest': ('a broad rounded torso crossed by curved horizontal ribs and a vertical spine',
              'a wide trunk outline with a stack of curved rib bands and a central spine'),
    'Lymph Node': ('a bean-shaped structure with a notch on one side, a bright cortex and a darker centre',
                   'a kidney-bean outline with an indented hilum, a bright rim and a darker core'),
}
PATHOLOGY_EVIDENCE: dict[str, tuple[str, ...]] = {
    'Mass': ('a large, irregular, lobulated lesion with heterogeneous bright texture',
             'a big bright lesion with a lumpy border and mottled interior'),
    'Cyst': ('a medium-sized, smooth round lesion with a dark homogeneous interior and a thin bright rim',
             'a well-circumscribed dark round area with a uniform inside and a thin bright wall'),
    'Nodule': ('a small, round, uniformly bright lesion with a sharp margin',
               'a compact bright round spot with crisp edges'),
    'Calcification': ('a cluster of tiny, very bright dots',
                      'several pin-point, intensely bright specks grouped together'),
    'Infiltrate': ('a large, ill-defined area of hazy, streaky change with blurred edges',
                   'a broad, faint streaky haze whose borders fade into the surrounding tissue'),
}
REGION_EVIDENCE: dict[str, tuple[str, ...]] = {
    'Left Upper': ('upper-left part of the image, outside the central square',
                   'top-left quadrant, away from the centre'),
    'Right Upper': ('upper-right part of the image, outside the central square',
                    'top-right quadrant, away from the centre'),
    'Left Lower': ('lower-left part of the image, outside the central square',
                   'bottom-left quadrant, away from the centre'),
    'Right Lower': ('lower-right part of the image, outside the central square',
                    'bottom-right quadrant, away from the centre'),
    'Center Region': ('central square of the image', 'middle of the image, inside the central zone'),
}

_COT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # task: (evidence sentences, conclusion sentences); {ev} evidence, {ans} option text, {L} letter.
    'modality_classification': (
        ('The image shows {ev}.', 'I see {ev}.', 'Visually, this is {ev}.'),
        ('That appearance is characteristic of {ans}, so the answer is {L}.',
         'These are the hallmarks of {ans}; option {L}.', 'This signature points to {ans} (option {L}).')),
    'anatomy_identification': (
        ('The main structure is {ev}.', 'I can see {ev}.', 'The image contains {ev}.'),
        ('That outline identifies the anatomy as {ans}, so the answer is {L}.',
         'This is the typical shape of {ans} (option {L}).', 'So the anatomy shown is {ans}: option {L}.')),
    'anomaly_detection/abnormal': (
        ('Within the {anat} there is {ev} in the {where}.', 'I see {ev} in the {where}, standing out from the {anat}.'),
        ('Normal tissue would look uniform, so an abnormality is present: {ans} ({L}).',
         'Such a focal change is not normal anatomy, hence {L}: {ans}.')),
    'anomaly_detection/normal': (
        ('The {anat} shows its usual texture and no focal lesion anywhere in the field.',
         'I see only {ev}, with uniform texture and nothing that stands out.'),
        ('Therefore the answer is {ans}, option {L}.', 'With no lesion visible, the answer is {L}: {ans}.')),
    'pathology_characterization/abnormal': (
        ('The lesion is {ev}.', 'In the {where} there is {ev}.'),
        ('These features are typical of {ans}, so the answer is {L}.',
         'That pattern characterizes {ans} (option {L}).')),
    'pathology_characterization/normal': (
        ('No focal lesion stands out from the {anat}; the texture is uniform throughout.',
         'I find no lesion anywhere in the {anat}.'),
        ('With nothing to characterize, the answer is {ans} ({L}).', 'So the finding is {ans}: option {L}.')),
    'lesion_localization/abnormal': (
        ('There is {ev}; its centre lies in the {where}.', 'The lesion, {ev}, is centred in the {where}.'),
        ('On the five-region grid that is {ans}, option {L}.', 'Hence it is located in {ans} ({L}).')),
    'lesion_localization/normal': (
        ('No lesion is visible anywhere in the {anat}, so it cannot be placed in any region.',
         'I see only normal-looking {anat} and no focal finding to localize.'),
        ('The answer is {ans} ({L}).', 'So the correct option is {L}: {ans}.')),
}


# The same conclusions without the option letter, one for one (same count per key, so a dataset drawn with either
# set consumes the same random numbers and differs only in these sentences). For the ``option`` answer format
# (``schema.ANSWER_FORMATS``), where the answer block holds the option text and a letter in the thought would be
# a second, redundant answer.
_CONCLUSION_TEXT: dict[str, tuple[str, ...]] = {
    'modality_classification': ('That appearance is characteristic of {ans}.', 'These are the hallmarks of {ans}.',
                                'This signature points to {ans}.'),
    'anatomy_identification': ('That outline identifies the anatomy as {ans}.', 'This is the typical shape of {ans}.',
                               'So the anatomy shown is {ans}.'),
    'anomaly_detection/abnormal': ('Normal tissue would look uniform, so an abnormality is present: {ans}.',
                                   'Such a focal change is not normal anatomy, hence: {ans}.'),
    'anomaly_detection/normal': ('Therefore the answer is: {ans}.', 'With no lesion visible, the answer is: {ans}.'),
    'pathology_characterization/abnormal': ('These features are typical of {ans}.',
                                            'That pattern characterizes {ans}.'),
    'pathology_characterization/normal': ('With nothing to characterize, the answer is {ans}.',
                                          'So the finding is {ans}.'),
    'lesion_localization/abnormal': ('On the five-region grid that is {ans}.', 'Hence it is located in {ans}.'),
    'lesion_localization/normal': ('The answer is {ans}.', 'So the correct option is {ans}.'),
}
assert all(len(_CONCLUSION_TEXT[k]) == len(v[1]) for k, v in _COT.items()) and set(_CONCLUSION_TEXT) == set(_COT)


def make_cot(rng: np.random.Generator, task: str, *, modality: str, anatomy: str, pathology: str | None,
             region: str | None, answer_text: str, letter: str | None) -> str:
  """Two sentences: the visual evidence that was drawn, then the reasoning to ``answer_text`` / ``letter``.

  ``letter=None``: the conclusion names the option text only (``_CONCLUSION_TEXT``); the random draws are the same.
  """
  abnormal = pathology is not None
  pick = lambda xs: xs[int(rng.integers(len(xs)))]
  if task == 'modality_classification':
    key, ev = task, pick(MODALITY_EVIDENCE[modality])
  elif task == 'anatomy_identification':
    key, ev = task, pick(ANATOMY_EVIDENCE[anatomy])
  else:
    key = f'{task}/{"abnormal" if abnormal else "normal"}'
    ev = pick(PATHOLOGY_EVIDENCE[pathology]) if abnormal else pick(ANATOMY_EVIDENCE[anatomy])
  where = pick(REGION_EVIDENCE[region]) if abnormal else ''
  first, second = _COT[key]
  if letter is None:
    second = _CONCLUSION_TEXT[key]
  fill = dict(ev=ev, anat=anatomy.lower(), where=where, ans=answer_text, L=letter)
  s = pick(first).format(**fill) + ' ' + pick(second).format(**fill)
  return s[0].upper() + s[1:]


def pick_question(rng: np.random.Generator, task: str) -> str:
  return QUESTIONS[task][int(rng.integers(len(QUESTIONS[task])))]


def check_templates(questions: dict[str, Sequence[str]] = QUESTIONS) -> None:
  """Raises if a task lacks exactly 10 distinct phrasings."""
  for task in TASKS:
    qs = questions.get(task, ())
    if len(qs) != 10 or len(set(qs)) != 10:
      raise ValueError(f'task {task!r} needs 10 distinct question phrasings, has {len(set(qs))}')
