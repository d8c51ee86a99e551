"""`python -m esper.tamiyo.policy`: the same as the `esper-policy` command."""

import sys

from esper.tamiyo.policy.cli import main

sys.exit(main())
