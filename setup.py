from setuptools import find_packages, setup

setup(
    name="yolo_q",
    version="0.1.0",
    description="YOLOv6-style detection training with quantization (PTQ, QAT, INT8 export) built in",
    packages=find_packages(include=["yolo_q", "yolo_q.*", "deploy"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "omegaconf>=2.3",
        "PyYAML",
        "opencv-python-headless",
        "pycocotools",
        "tensorboard",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "dev": ["pytest", "pytest-xdist", "hypothesis", "scipy", "onnx", "onnxruntime",
                "onnxscript"],
        # GPU machines only: TensorRT 10 Python API + CUDA (not installable on CPU-only hosts)
        "trt": ["tensorrt>=10", "cuda-python"],
    },
)
