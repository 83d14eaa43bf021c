"""`python -m tests.helpers.stalled_train CONFIG.json [CLI args]`: the training CLI whose data
stalls for good after a number of batches (the `stall_after` key of the JSON file), printing
STALLED when it does. Tests send it signals and check that it still ends."""

import json
import sys
import threading

import jax

from mini_internvl_jax.cli import train as cli
from mini_internvl_jax.train import trainer


def main() -> int:
    path, *rest = sys.argv[1:]
    stall_after = json.load(open(path)).pop("stall_after")
    real = trainer.make_iterator

    def stalling(*a, **k):
        it = real(*a, **k)
        original = type(it).__next__

        def next_or_stall(self):
            if self.index >= stall_after:
                print("STALLED", flush=True)
                threading.Event().wait()  # a pipeline that never delivers
            return original(self)

        type(it).__next__ = next_or_stall
        return it

    trainer.make_iterator = stalling
    jax.config.update("jax_platforms", "cpu")
    cfg = json.load(open(path))
    cfg.pop("stall_after")
    yaml_path = path + ".yaml"
    with open(yaml_path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML
    return cli.main(["--config", yaml_path, *rest])


if __name__ == "__main__":
    sys.exit(main())
