"""Give the official YOLOv6 trainer its own view of one of our synthetic datasets (issue #16,
side-by-side run): a new folder whose images/ and labels/ files are hard links to ours (no copy,
and nothing the official code writes - its label caches, its annotations/instances_val.json -
lands in our dataset), plus the data YAML its ``tools/train.py --data-path`` reads.

    python benchmarks/official/prepare.py --src data/ref160 --out ../official_data/ref160
"""
import argparse
import os
import shutil
from pathlib import Path

import yaml


def link_tree(src: Path, dst: Path) -> int:
    n = 0
    for f in sorted(src.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            t = dst / f.relative_to(src)
            t.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, t)
            except OSError:  # another file system
                shutil.copyfile(f, t)
            n += 1
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="our dataset folder (with synthetic.yaml)")
    p.add_argument("--out", required=True, help="new folder for the official trainer")
    a = p.parse_args(argv)
    src, out = Path(a.src).resolve(), Path(a.out).resolve()
    ours = yaml.safe_load((src / "synthetic.yaml").read_text())
    if out.exists():
        raise SystemExit(f"error: {out} exists; remove it first")
    n = sum(link_tree(src / sub, out / sub) for sub in ("images", "labels"))
    names = ours["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    data = {"train": str(out / "images" / "train"), "val": str(out / "images" / "val"),
            "is_coco": False, "nc": len(names), "names": names}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"linked {n} files -> {out}; data YAML {out / 'data.yaml'}")


if __name__ == "__main__":
    main()
