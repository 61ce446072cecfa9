"""Figures for people, formatted one way wherever they are shown (plan, progress lines, model cards)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """`4.2 s`, `63 s`, `12.5 min`, `3.1 h`: two or three significant digits, the unit a person reads fastest."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
