"""Keep secrets out of everything a run writes: recipes, manifests, metrics, cards, errors.

A value is a secret if it looks like a known token format (Hugging Face, OpenAI, GitHub, Slack,
AWS) or equals the value of an environment variable whose name says it is one (HF_TOKEN,
WANDB_API_KEY, ...). Bare 40-hex strings are not redacted: they are git commits and revisions.
"""

from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "<redacted>"
TOKEN_PATTERNS = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|xox[abpr]-[A-Za-z0-9\-]{10,}"
    r"|AKIA[0-9A-Z]{16})\b"
)
SECRET_NAMES = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|PRIVATE_KEY", re.IGNORECASE)


def _env_secrets() -> list[str]:
    return sorted((v for k, v in os.environ.items() if SECRET_NAMES.search(k) and len(v) >= 8), key=len, reverse=True)


def redact_text(text: str) -> str:
    for value in _env_secrets():
        text = text.replace(value, REDACTED)
    return TOKEN_PATTERNS.sub(REDACTED, text)


def redact(value: Any) -> Any:
    """A copy of `value` (nested dicts, lists, strings) with every secret replaced."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value
