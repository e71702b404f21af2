"""PEP 517 build backend: setuptools, with torch (and ninja) needed for wheels only.

``fastdistill._C`` is compiled against torch, so building a wheel (or an editable install) in an
isolated environment needs torch there; an sdist is only source files and needs no torch. Plain
``setuptools.build_meta`` cannot say so (``[build-system] requires`` is one list for both), so this
module adds the wheel-only requirements in ``get_requires_for_build_wheel`` / ``_editable`` and
delegates everything else to setuptools.

Builds with ``--no-build-isolation`` (the README's install) use the torch that is already installed.
"""

from __future__ import annotations

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (build_sdist, build_wheel, prepare_metadata_*, ...)

# Keep in sync with [project] dependencies in pyproject.toml.
WHEEL_REQUIRES = ["torch>=2.11", "ninja"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + WHEEL_REQUIRES


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + WHEEL_REQUIRES
