"""``python -m softkd.cli ARGS``: the ``softkd`` command (torchrun and accelerate launch use this form)."""

from softkd.cli import main

main()
