"""fastpeft: fused LoRA / QLoRA fine-tuning kernels for PyTorch.

The repository's ``kernels/`` folder installs as the subpackage
``fastpeft.kernels``; no top-level ``kernels`` module is installed (that name
belongs to a real package transformers and bitsandbytes import).
"""

from setuptools import find_packages, setup

setup(
    name="fastpeft",
    version="0.1.0",
    description="Fused Triton LoRA/QLoRA layers, drop-in for nn.Linear and peft",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["fastpeft", "fastpeft.*"]), "fastpeft.kernels"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels"},
    install_requires=[
        "torch>=2.4,<2.15",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "tqdm",
        "matplotlib",
        "safetensors",
        "transformers>=4.45",
        "pyyaml",
    ],
    package_data={"fastpeft": ["assets/*", "assets/**/*"]},
    extras_require={
        # trl and datasets: tests/test_trl_integration.py (SFTTrainer); together with pyarrow and pandas they add
        # about 70 MB of wheels and 20-30 s of install.
        # scipy: peft's LoftQ (tests/test_lora_init.py compares with it) needs it and no longer arrives with the others.
        "dev": ["pytest", "pytest-benchmark", "peft", "bitsandbytes", "transformers", "accelerate", "ruff", "trl",
                "datasets", "scipy"],
    },
    entry_points={"console_scripts": ["fastpeft = fastpeft.cli:main"]},
)
