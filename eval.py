"""Evaluate a training checkpoint: ``python eval.py --workdir W [--files F] [--out FILE]``.

The same as the installed ``v4jax-eval``; ``--help`` and ``v4jax/cli/eval.py`` say the rest.
"""

import sys

from v4jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
