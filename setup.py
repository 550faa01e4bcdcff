"""Maps the top-level layer folders onto one namespace: runtime/ -> galip.runtime, ...

Package discovery lives here because pyproject.toml cannot express "every subpackage of
a remapped folder"; everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

LAYERS = ("runtime", "train", "export", "bench")

packages = ["galip"]
package_dir = {"galip": "galip"}
for layer in LAYERS:
    packages.append(f"galip.{layer}")
    package_dir[f"galip.{layer}"] = layer
    packages += [f"galip.{layer}.{sub}" for sub in find_packages(layer)]

setup(packages=packages, package_dir=package_dir)
