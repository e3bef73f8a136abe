"""How closely each learner's bfloat16 meta-gradient follows its float32 one, over several seeded batches.

``MetaLearner.bf16_safe`` (which learners may train with ``train.precision=bf16``) is decided from this
measurement: a learner is offered bf16 when the cosine between its bf16-autocast and float32
meta-gradients is at least ``AGREEMENT`` on every one of the seeded 5-way 1-shot batches that
``tests/test_amp.py`` checks. Run this under other CPU kernels as well to see how much of the spread is
the kernels' and how much the batches'::

    python benchmarks/bf16_agreement.py
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 python benchmarks/bf16_agreement.py \
        --out benchmarks/results/bf16_agreement_default.json

Writes ``{"cpu_capability", "seeds", "cosines": {learner: [one per seed]}, "min", "bf16_safe"}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_amp import bf16_cosine  # noqa: E402  (the very computation the test asserts on)

from metaloop.algorithms import LEARNERS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="number of seeded batches (default 8)")
    parser.add_argument("--out", default="benchmarks/results/bf16_agreement.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cosines = {}
    for name in sorted(LEARNERS):
        cosines[name] = [round(bf16_cosine(name, seed), 5) for seed in range(args.seeds)]
        print(f"{name:10s} safe={LEARNERS[name].bf16_safe!s:5s} min={min(cosines[name]):.4f} {cosines[name]}")
    result = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "seeds": args.seeds,
        "cosines": cosines,
        "min": {name: min(values) for name, values in cosines.items()},
        "bf16_safe": {name: LEARNERS[name].bf16_safe for name in sorted(LEARNERS)},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
