"""Datasets of the course: real Fashion-MNIST, toy distributions, shapes with captions,
and loaders for CelebA and CIFAR-10 (for users who have them)."""
from course_lib.data import shapes, toy
from course_lib.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from course_lib.data.fashion_mnist import DatasetError, load_fashion_mnist
from course_lib.data.shapes import make_shapes
from course_lib.data.vision import find_celeba, find_cifar10, load_celeba, load_cifar10

__all__ = ["FASHION_MNIST_CLASSES", "DatasetError", "find_celeba", "find_cifar10",
           "load_celeba", "load_cifar10", "load_fashion_mnist", "make_shapes", "shapes", "toy"]
