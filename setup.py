"""megaslm: multilingual spoken language models over discrete speech units, at scale.

Install order matters on a CPU machine: install torch==2.13.0 first (the CPU wheel), then this
package; a bare `pip install deepspeed` into an empty environment pulls CUDA torch (several GB).
The pins below admit the GPU machine's Python 3.12 image (torch 2.11, triton 3.6) and CI's
Python 3.11 CPU stack (torch 2.13, triton 3.9); megatron-core stays at 0.16.x on both (0.17
needs Python >= 3.12).
"""
from setuptools import find_packages, setup

setup(
    name="megaslm",
    version="0.1.0",
    description="Cross-lingual speech-unit language models with megatron-core and DeepSpeed",
    python_requires=">=3.11",
    packages=find_packages(include=["megaslm", "megaslm.*", "kernels", "kernels.*", "data_tools", "data_tools.*",
                                    "evals", "evals.*"]),
    package_data={"data_tools": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.11,<2.14",
        "deepspeed==0.19.8",
        "megatron-core>=0.16.1,<0.17",
        "triton>=3.6,<3.10",
        "sentencepiece>=0.2.0,<0.3",
        "numpy>=1.26,<2.5",
        "nvidia-ml-py>=12,<14",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        # a fast JSON parser for unit JSONL builds (the standard library's json is the bottleneck)
        "orjson>=3.9",
        # the manifest content hash (XXH3-128: megaslm/vocab.py says why not SHA-256)
        "xxhash>=3.0",
        # Hugging Face dataset inputs of `data_tools build` (parquet, Arrow IPC, save_to_disk folders:
        # data_tools/arrow_inputs.py); >=16: the first built against NumPy 2, which numpy<2.5 above admits
        "pyarrow>=16",
        # audio -> units: Mimi / HuBERT through transformers, audio I/O, k-means codebooks
        # <5.25: transformers 5.25 requires Hugging Face's hub-kernels distribution, whose top-level package
        # `kernels` collides with ours (megaslm/deps.py says why, and stops with one line if it is installed)
        "transformers>=4.45,<5.25",
        "soundfile>=0.12",
        "scikit-learn>=1.3",
        "scipy>=1.10",  # polyphase resampling of audio (data_tools/audio/io.py)
        # sweeps on SLURM
        "submitit>=1.5",
    ],
    extras_require={
        # wandb in `test` too: CI installs .[test] and tests the tracking offline (tests/train/test_tracking.py)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "wandb>=0.17"],
        # experiment tracking (logging.wandb: true; megaslm/tracking.py)
        "wandb": ["wandb>=0.17"],
    },
)
