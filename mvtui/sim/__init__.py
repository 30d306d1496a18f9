"""The vLLM simulator (`mvtui sim`): a real HTTP server that looks like vLLM from outside."""

from mvtui.sim.config import SimConfig, add_sim_arguments, config_from_args
from mvtui.sim.runner import run_sim_from_args
from mvtui.sim.server import SimServer
from mvtui.sim.state import SimStats

__all__ = ["SimConfig", "SimServer", "SimStats", "add_sim_arguments", "config_from_args", "run_sim_from_args"]
