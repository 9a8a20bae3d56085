"""``python -m medssl_kit``: the ``medssl`` command line (also what ``--nproc`` and ``torchrun``
start in every worker)."""

from medssl_kit.cli import main
from medssl_kit.train.distributed import exit_process

exit_process(main())
