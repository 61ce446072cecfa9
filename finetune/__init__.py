"""Fine-tune LLMs with LoRA and QLoRA from version-controlled YAML recipes."""

import logging

__version__ = "0.1.0"

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional hub kernel is missing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
