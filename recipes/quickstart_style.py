"""Generation metrics of the DPO quickstart (recipes/quickstart-dpo.yaml): style and task, measured apart.

The preference set prefers the reversed list joined with ' | ' over the SFT model's ', '. Both are
correct answers, so a preference stage must change the style without breaking the task:
- preferred_style: the answer is three items joined with ' | ' (right or wrong items);
- task_exact_match: the answer is the correct reversal, in either style (the SFT task, kept or not).
The reference each metric gets is the chosen answer (' | ' style).
"""

from __future__ import annotations

import re

PREFERRED = " | "


def preferred_style(prediction: str, reference: str) -> float:
    items = prediction.strip().split(PREFERRED)
    return float(len(items) == 3 and all(item and re.fullmatch(r"\w+", item) for item in items))


def task_exact_match(prediction: str, reference: str) -> float:
    expected = reference.strip().split(PREFERRED)
    for separator in (PREFERRED, ", "):
        if prediction.strip().split(separator) == expected:
            return 1.0
    return 0.0
