#!/usr/bin/env python3
"""Deploy sdserve to Amazon SageMaker: package, deploy, invoke, teardown, policy.

The entry script; the code is the sdserve_sagemaker/ package beside it (its
__init__.py describes the commands). See README.md.
"""

import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # e.g. under `python -P`
    sys.path.insert(0, HERE)

from sdserve_sagemaker.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
