"""``python -m flux_triton <command>``: the commands the Makefile runs (``--help`` on each)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("flux_triton.tools.demo:main", "the main job: a denoising loop through each public model, with parity"),
    "serve": ("flux_triton.deploy.commands:serve", "serve a model repository on loopback, healing failed models"),
    "guard": ("flux_triton.deploy.guard.process:main", "the guard in front of a running tritonserver"),
    "health": ("flux_triton.deploy.commands:health", "probe every model of a running server with a real inference"),
    "engine": ("flux_triton.deploy.commands:engine", "build an engine, then its flux_dit repository"),
    "repo": ("flux_triton.deploy.commands:repo", "generate and check the flux_dit repository of an engine"),
    "place": ("flux_triton.deploy.placement:main", "place a model's instances: one per GPU, or one across GPUs"),
    "load": ("flux_triton.tools.loadtest:main", "bounded load test with cross-talk checks"),
    "tiny": ("flux_triton.tools.tiny:main", "write the embedded tiny FLUX transformers, text encoders and VAE"),
    "calibrate": ("flux_triton.tools.calibrate:main", "static FP8 activation scales for a model, beside its weights"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items())
        sys.exit(f"usage: python -m flux_triton <command> [--help]\n\n{lines}")
    target, _ = COMMANDS[argv[0]]
    module, function = target.split(":")
    getattr(importlib.import_module(module), function)(argv[1:])


if __name__ == "__main__":
    main()
