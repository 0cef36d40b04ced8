"""Write a random-weight model folder in NVIDIA's NLD release layout (for tests, demos and scale checks).

    python scripts/make_nld_fixture.py OUT [--shape tiny|1b|3b|8b] [--dtype bfloat16] [--seed 0] [--no-adapter]

The folder has what a downloaded Nemotron-Labs-Diffusion checkpoint has: config.json (model_type
nemotron_labs_diffusion, auto_map, dtype, NLD fields; the 8B's fields with the chosen shape), sharded safetensors
with model.safetensors.index.json, tokenizer files with chat_template.jinja, generation_config.json with a list
of EOS ids, and a linear_spec_lora/ PEFT adapter on o_proj (task_type CAUSAL_LM, inference_mode true).
"""

from __future__ import annotations

import argparse

from nld_lora.model.release import SHAPES
from nld_lora.testing.release_fixture import write_release_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--original-max-positions", type=int, default=None,
                   help="YaRN original_max_position_embeddings (default: 64 for tiny, 16384 otherwise)")
    p.add_argument("--no-adapter", action="store_true", help="leave out linear_spec_lora/")
    args = p.parse_args()
    folder = write_release_folder(args.out, args.shape, dtype=args.dtype, seed=args.seed,
                                  original_max_positions=args.original_max_positions, adapter=not args.no_adapter)
    print(folder)


if __name__ == "__main__":
    main()
