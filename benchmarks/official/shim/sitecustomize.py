"""For the official trainer's run only (this folder is on its PYTHONPATH, never on ours).

The official ``tools/train.py`` raises every image size below 256 px to 256
(``check_img_size(..., floor=256)``), so ``--img-size 160`` silently trains at 256 px. With
``OFFICIAL_MIN_IMG_SIZE`` set, its size check keeps that floor instead (still a multiple of
the stride): the official code runs unmodified, only this one check is replaced at start-up.

``OFFICIAL_SEED``: the official trainer seeds with ``1 + rank`` (0 for a single-process CPU
run) and has no option for it; with this set, that call seeds with the given value instead
(for a second seed of the side-by-side comparison).
"""
import os

if os.environ.get("OFFICIAL_MIN_IMG_SIZE"):
    import yolov6.utils.general as _general

    _check = _general.check_img_size
    _floor = int(os.environ["OFFICIAL_MIN_IMG_SIZE"])

    def check_img_size(imgsz, s=32, floor=0):
        return _check(imgsz, s, floor=min(floor, _floor))

    _general.check_img_size = check_img_size


if os.environ.get("OFFICIAL_SEED"):
    import yolov6.utils.envs as _envs

    _seed_fn = _envs.set_random_seed
    _seed = int(os.environ["OFFICIAL_SEED"])

    def set_random_seed(seed, deterministic=False):
        print(f"[shim] official seed {seed} -> {_seed}")
        return _seed_fn(_seed, deterministic=deterministic)

    _envs.set_random_seed = set_random_seed
