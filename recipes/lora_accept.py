"""Raise self-speculative acceptance on your prompts: collect AR targets -> train the draft LoRA -> report.

    accelerate launch recipes/lora_accept.py [--config recipes/configs/tiny_code.yaml] [key=value ...]

With no arguments it runs the embedded default (tiny tri-mode code model, stdlib prompts) on CPU in minutes.
Overrides use dotted keys, e.g. `train.steps=200 collect.limit=100 out=runs/try2`. A re-run skips finished
stages and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nld_lora.config_io import ConfigError, load_config
from nld_lora.parallel import finish_processes
from nld_lora.recipe import RecipeConfig, run_recipe
from nld_lora.report import headline

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_code.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="recipe YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(RecipeConfig, args.config, args.overrides)
        report = run_recipe(cfg)
    except (ConfigError, ValueError, OSError) as err:
        print(f"lora_accept: error: {err}", file=sys.stderr)
        finish_processes(barrier=False)
        return 2
    finish_processes()
    if report:
        print("\n=== before -> after (self-speculation, greedy, held-out prompts) ===")
        print(headline(report))
        print(f"report: {Path(cfg.out) / 'report' / 'report.md'}")
        if (Path(cfg.out) / "eval" / "eval.md").exists():
            print(f"eval (accuracy, latency, cost per mode): {Path(cfg.out) / 'eval' / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
