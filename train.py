"""Train, validate, test or predict with kdlora from a YAML config (LightningCLI).

    python train.py fit --config configs/demo/teacher.yaml
    python train.py fit --help
"""

import sys

from kdlora.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
