"""Only for the optional C speedups; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tracesock._speedups",
            sources=["src/tracesock/_speedups.c"],
            optional=True,  # no compiler: the pure-Python path is used
        )
    ]
)
