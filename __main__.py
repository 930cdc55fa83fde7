import sys

from funkflow.pipeline.running.cli import main

sys.exit(main())
