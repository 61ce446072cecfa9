"""`python -m finetune.cli`: the same as the `finetune` console script."""

from finetune.cli import main

main()
