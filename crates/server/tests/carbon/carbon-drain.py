"""Runs Debian's carbon-cache (graphite-carbon) for the Graphite export test.

carbon-cache 1.1.7 loses what it received in the last second before a
SIGTERM: its writer thread sleeps a second between cache drains and ends
when the reactor stops, without draining again. This wrapper makes that
thread drain the cache once more as it ends, so that what the test reads
from the whisper files after a restart is what Carbon received, and the
test checks Widgetry's side of the protocol. Arguments are carbon-cache's.
"""
import importlib.abc, importlib.util, sys

class DrainOnExit(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "carbon.writer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            forever = module.writeForever
            def forever_then_drain():
                forever()
                module.writeCachedDataPoints()
            module.writeForever = forever_then_drain
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, DrainOnExit())
from carbon.util import run_twistd_plugin
run_twistd_plugin("/usr/bin/carbon-cache")
