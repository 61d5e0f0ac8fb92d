"""Give a fine-tuned network the mask refiner of the model it was fine-tuned from.

    .venv/bin/python scripts/transplant_refiner.py MODEL DONOR OUT

MODEL: the fine-tuned checkpoint (e.g. a run's model_final.pt); DONOR: the model it started from
(e.g. models/default/model.pt); OUT: where to write the result. Measure both on a validation set
(`nanoseg evaluate`) before shipping either.
"""

from __future__ import annotations

import sys

from nanoseg.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from nanoseg_training.train_refiner import transplant_refiner


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    model, donor, out = argv
    ckpt = transplant_refiner(load_checkpoint(model), load_checkpoint(donor), file_sha256(donor))
    print(f"wrote {save_checkpoint(ckpt, out, half=ckpt.stored_half)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
