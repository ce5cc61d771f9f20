"""`python -m dualpseudo` (what `accelerate launch -m dualpseudo` runs)."""
import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", 1)) > 1:
    # Under a multi-process launch every artifact is written and the process group is gone by now; skip the
    # interpreter's teardown, where C++ destructors of communication threads can abort (SIGABRT) at random.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
