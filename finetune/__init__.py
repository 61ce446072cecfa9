"""Fine-tune LLMs with LoRA and QLoRA from version-controlled YAML recipes."""

__version__ = "0.1.0"
