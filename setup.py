"""Package definition for mtz_tf."""

import setuptools

setuptools.setup(
    name="mtz_tf",
    version="0.1.0",
    description=(
        "Multi-Task Zipping, Neuron Merging and ISTA channel pruning for Keras models."
    ),
    packages=setuptools.find_packages(include=["mtz_tf", "mtz_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "tensorflow-datasets>=4.9",
        "numpy>=1.26",
        "scipy>=1.11",
        "absl-py>=2.0",
        "matplotlib>=3.8",
    ],
)
