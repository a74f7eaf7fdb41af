"""reid_keras: person re-identification and person search in TensorFlow/Keras 3.

TensorFlow is not a hard requirement on purpose: Colab and GPU machines already ship it, and a
pinned `tensorflow` would pull a 600 MB reinstall (or the GPU build onto a CPU-only machine).
Pick it with an extra: `.[cpu]` installs `tensorflow-cpu`, `.[gpu]` installs `tensorflow[and-cuda]`.
"""
from setuptools import find_packages, setup

setup(
    name="reid_keras",
    version="0.1.0",
    description="Person re-identification and person search in TensorFlow/Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["reid_keras", "reid_keras.*"]),
    install_requires=[
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pillow>=9.0",
        "scipy>=1.10",
        "h5py>=3.8",
        "pandas>=1.5",
        "matplotlib>=3.6",
        "psutil>=5.9",
        "scikit-learn>=1.2",
        "tensorboard>=2.16",  # the TensorBoard callback; tensorflow-cpu 2.21 no longer pulls it in
    ],
    extras_require={
        "cpu": ["tensorflow-cpu>=2.16"],
        "gpu": ["tensorflow[and-cuda]>=2.16"],
        "test": ["pytest>=7.0", "nbformat>=5.7", "nbclient>=0.7", "ipykernel>=6.0"],
    },
)
