"""Process-group setup: one place that reads the launcher's environment."""

from .env import DistEnv, detect_env, init_distributed

__all__ = ["DistEnv", "detect_env", "init_distributed"]
