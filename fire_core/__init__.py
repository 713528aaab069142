"""fire_core: feedback-refinement learning for vision-language models (FIRE and DRESS).

The numbered notebooks under ``notebooks/`` call into this package, one stage each::

    from fire_core import config, world
    cfg = config.load("00_build_world", ["scale=smoke"])
    result = world.build(cfg)
"""

__version__ = "0.1.0"
