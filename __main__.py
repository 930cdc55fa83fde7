import sys

from funkflow.pipeline.app.cli import main

sys.exit(main())
