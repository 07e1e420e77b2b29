"""``python -m course_lib.data``: find (or download) Fashion-MNIST and verify its checksums."""
import sys

from course_lib.data import fashion_mnist


def main() -> int:
    try:
        paths = fashion_mnist.locate(allow_download=True)
        for split in ("train", "test"):
            images, labels = fashion_mnist.load_fashion_mnist(split)
            print(f"Fashion-MNIST {split}: {len(images)} images, checksums OK "
                  f"({paths[split, 'images'].parent})")
    except fashion_mnist.DatasetError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
