"""Data: sources, formats, chat templates, loss masks."""

from finetune.data.prepare import DataStats, PreparedData, prepare_data

__all__ = ["DataStats", "PreparedData", "prepare_data"]
