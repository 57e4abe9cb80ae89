"""`python -m corpus [--out corpus/models] [--only resnet50,bert_base] [--force]`: see corpus/build.py."""

import sys

from corpus.build import main

sys.exit(main())
