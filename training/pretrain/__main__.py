"""`python -m training.pretrain`, `accelerate launch -m training.pretrain`, `torchrun -m training.pretrain`."""

import sys

from training.pretrain.trainer import main

sys.exit(main())
