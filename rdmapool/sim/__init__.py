"""Trace-driven simulation of the pool's eviction policies: load a request trace, replay it against a policy
object (the very classes memory servers run) at a capacity, and account hits as a prefix cache sees them."""

from rdmapool.sim.cost import MODELS, ModelCost
from rdmapool.sim.oracle import FutureOracle
from rdmapool.sim.replay import SimResult, make_policy, parse_capacity, replay
from rdmapool.sim.trace import Request, Trace, load_trace

__all__ = ["MODELS", "ModelCost", "FutureOracle", "SimResult", "make_policy", "parse_capacity", "replay",
           "Request", "Trace", "load_trace"]
