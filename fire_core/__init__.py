"""fire_core: feedback-refinement learning for vision-language models (FIRE and DRESS).

The numbered notebooks under ``notebooks/`` call into this package, one stage each::

    from fire_core import config, world
    cfg = config.load("00_build_world", ["scale=smoke"])
    result = world.build(cfg)
"""

__version__ = "0.1.0"

import os as _os

# Reproducible floating point on the CPU (see provenance.make_deterministic): MKL reads these
# when it starts, so they are set before anything imports torch. The Makefile exports the same.
for _k, _v in (("MKL_CBWR", "AUTO,STRICT"), ("MKL_DYNAMIC", "FALSE"), ("OMP_DYNAMIC", "FALSE")):
    _os.environ.setdefault(_k, _v)
