"""The PEP 517 build backend of moe-blocks: setuptools' own, less one notice.

Our packages are mapped from other folders (``kernels/`` and ``models/`` install as
``moe_blocks.kernels`` and ``moe_blocks.models``), so ``pip install -e .`` makes setuptools use
an import-hook editable install, and it prints a ``BuildBackendWarning: Editable installation``
("be careful with folders in your working directory with the same name as your package") on
every install. It is information, not a fault: the one folder that does share a name with an
installed package, ``kernels/``, hands over to it (``kernels/_checkout.py``). Every other
warning of setuptools still shows.
"""

import warnings

from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, unchanged)

warnings.filterwarnings("ignore", message="Editable installation", category=UserWarning)
