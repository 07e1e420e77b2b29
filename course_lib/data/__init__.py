"""Datasets of the course: real Fashion-MNIST, toy distributions, shapes with captions, CelebA."""
from course_lib.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from course_lib.data.fashion_mnist import DatasetError, load_fashion_mnist

__all__ = ["FASHION_MNIST_CLASSES", "DatasetError", "load_fashion_mnist"]
