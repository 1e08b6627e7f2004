import sys

from hf_merge.cli import main

sys.exit(main())
