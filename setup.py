"""Installs the atb_models package; its dependencies are the two requirement files, so they are stated once."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_requirements(*relative_paths: str) -> list[str]:
    lines = []
    for relative_path in relative_paths:
        for line in (ROOT / relative_path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


setup(
    name="atb_models",
    version="0.1.0",
    description="A paged-attention inference kit for Qwen2-VL on NPU, GPU and CPU",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["atb_models", "atb_models.*"]),
    package_data={"atb_models.demo": ["reader_model/*"],  # the bundled demo reader, its samples included
                  "atb_models": ["csrc/*.cpp", "csrc/*.h"]},  # the native CPU kernels, compiled on first use
    python_requires=">=3.11",
    install_requires=read_requirements("requirements/requirements.txt",
                                       "requirements/models/requirements_qwen2_vl.txt"),
    extras_require={
        "npu": ["torch-npu"],
        "test": ["pytest", "pytest-timeout", "openai>=1.0"],  # openai: the server tests use the real client
    },
)
