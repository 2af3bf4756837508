import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'^__version__ = "([^"]+)"', (here / "tcplock/__init__.py").read_text(), re.M)

setup(
    name="tcplock",
    version=version.group(1),
    description="A FIFO mutex (or N-slot semaphore) proxy in front of any TCP service",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["tcplock", "tcplock.*"]),
    python_requires=">=3.9",
    install_requires=["gevent>=22.10", "prometheus_client>=0.16"],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6", "gunicorn>=21", "cffi>=1.12"],
    },
    entry_points={"console_scripts": ["tcplock = tcplock.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Framework :: gevent",
        "Topic :: System :: Networking",
        "Operating System :: POSIX :: Linux",
    ],
)
