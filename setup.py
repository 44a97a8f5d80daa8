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
        # OpenVINO runtime (CPU; backend "openvino", tools' --openvino) and NNCF (the benchmark's
        # NNCF INT8 peer row)
        "openvino": ["openvino", "nncf", "onnx", "onnxscript"],
        # openvino (~180 MB, 2 small deps, ~10 s) is in dev so that CI runs its tests
        "dev": ["pytest", "pytest-xdist", "pytest-rerunfailures", "hypothesis", "scipy", "onnx", "onnxruntime",
                "onnxscript", "openvino"],
        # GPU machines only (see deploy/README.md; a CUDA build of torch is needed as well).
        # TensorRT 11 for a CUDA 13 driver (what `pip install tensorrt` resolves to):
        "trt": ["tensorrt-cu13>=11,<12", "onnx", "onnxruntime"],
        # TensorRT 11 for a CUDA 12 driver:
        "trt-cu12": ["tensorrt-cu12>=11,<12", "onnx", "onnxruntime"],
        # TensorRT 10.x (>= 10.8) for CUDA 12, like JetPack 6 deployments:
        "trt10": ["tensorrt-cu12>=10.8,<11", "onnx", "onnxruntime"],
    },
)
