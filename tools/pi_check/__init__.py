"""The Pi check: edge in emulated aarch64 Raspberry Pi OS roots (see check.py and docs/pi.md)."""

from .check import (MAX_ABS_STEPS, MIN_COSINE, TARGETS, CheckError, Target, cache_root,
                    default_datasets, main, missing_requirements, platform_tags, run_check,
                    runtime_requirements)

__all__ = ["MAX_ABS_STEPS", "MIN_COSINE", "TARGETS", "CheckError", "Target", "cache_root",
           "default_datasets", "main", "missing_requirements", "platform_tags", "run_check",
           "runtime_requirements"]
