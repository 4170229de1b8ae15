"""Train a DeepSeek-V4 model: ``python train.py [--config C] [--workdir W] [section.key=value ...]``.

The same as the installed ``v4jax-train``; ``--help`` and ``v4jax/cli/train.py`` say the rest.
"""

import sys

from v4jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
