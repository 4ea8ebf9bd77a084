"""What-if sweeps: a grid of RunConfigs run as Ray tasks, each run stored with its sweep.

    spec = SweepSpec(base, [parse_axis("block_size=8,16"), parse_axis("kv_budget=4MiB,16MiB")])
    sweep_id = create_sweep(store, spec)
    result = execute(store, sweep_id)              # local Ray; ray_address= joins a cluster

The engine never imports this package; it imports `engine` and `store`.
"""

from sweep.driver import Progress, SweepResult, create_sweep, execute
from sweep.spec import Axis, SweepError, SweepSpec, load_base, parse_axis

__all__ = ["Axis", "Progress", "SweepError", "SweepResult", "SweepSpec", "create_sweep",
           "execute", "load_base", "parse_axis"]
