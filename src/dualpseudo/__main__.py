"""`python -m dualpseudo` (what `accelerate launch -m dualpseudo` runs)."""
import sys

from .cli import main

sys.exit(main())
