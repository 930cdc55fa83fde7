import sys

from funkflow.pipeline.cli import main

sys.exit(main())
