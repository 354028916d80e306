"""`python -m grpo_care.demo [--quick] [--output_dir DIR]`: the same as `grpo-care demo`."""

import sys

from grpo_care.demo import main

sys.exit(main())
