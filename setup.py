"""fastflamingo: a fast, tested implementation of DeepMind's Flamingo visual language model.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are installed
as ``fastflamingo.kernels`` (PyPI already has an unrelated package named ``kernels``).
"""
from setuptools import find_packages, setup

PACKAGES = find_packages(include=["fastflamingo", "fastflamingo.*"]) + ["fastflamingo.kernels"]

setup(
    name="fastflamingo",
    version="0.1.0",
    description="Fast Flamingo visual language model: fused Triton image-causal cross-attention, "
                "OpenFlamingo / IDEFICS import, fast generation",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # transformers dropped 3.10 at 5.21 (and Python did, in October 2026)
    packages=PACKAGES,
    package_dir={"fastflamingo.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",  # idem
        "transformers>=5.10",  # the oldest fastflamingo works with: fastflamingo/versions.py
        "safetensors",
        "einops",
        "tqdm",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["triton>=3.6", "bitsandbytes>=0.46"],
        "quant": ["bitsandbytes>=0.46", "accelerate>=1.0"],
        # captioning's CIDEr: the COCO caption evaluation (its PTB tokenizer also needs Java)
        "eval": ["pycocoevalcap>=1.2"],
        "test": [
            # the tests compare with Hugging Face's own IDEFICS generate and logits processors as
            # 5.24 has them (before 5.20 its IDEFICS beam search fails, before 5.24 beam sampling
            # draws in another order)
            "transformers>=5.24",
            "pytest", "pytest-benchmark", "hypothesis", "triton>=3.6", "bitsandbytes>=0.46",
            "accelerate>=1.0", "open_clip_torch", "einops-exts", "timm", "torchvision", "pycocoevalcap>=1.2",
        ],
    },
    entry_points={"console_scripts": ["fastflamingo=fastflamingo.cli:main"]},
)
