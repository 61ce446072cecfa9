"""Stages over a finished run: terminal chat and the OpenAI-compatible server, and what they share (opening the run, generation, the vLLM launcher)."""
