"""Installs the `simclr_tf` package.

Dependency ranges are the ones tested together; see README.md. No
tensorflow-addons: it is end-of-life and does not install with current
TensorFlow, and everything used from it is in TensorFlow / Keras 3 now.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (HERE / "simclr_tf" / "__init__.py").read_text(),
    re.M,
).group(1)

TEST = [
    "pytest>=8,<10",
    "ruff>=0.6,<0.18",
    "psutil>=5.9,<8",
    "pillow>=10,<14",
]
QUICKSTART = ["scikit-learn>=1.4,<2", "matplotlib>=3.8,<4"]
# tensorflow-hub pulls tf_keras (Keras 2), which only TF Hub consumers of
# our export need; it stays out of the core package.
HUB = ["tensorflow-hub>=0.16,<0.17", "tf-keras>=2.16,<2.22"]

setup(
    name="simclr_tf",
    version=VERSION,
    description="SimCLR v1/v2 for TensorFlow 2 and Keras 3",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["simclr_tf", "simclr_tf.*"]),
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.3,<4",
        "tensorflow-datasets>=4.9.4,<5",
        "tensorboard>=2.16,<2.22",
        "absl-py>=1.4,<3",
        "numpy>=1.26,<3",
    ],
    extras_require={
        "test": TEST + QUICKSTART,
        "quickstart": QUICKSTART,
        "hub": HUB,
        "serving": ["tensorflow-serving-api>=2.16,<2.22"],
    },
)
