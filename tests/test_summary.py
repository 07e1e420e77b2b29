from torch import nn

from course_lib.summary import summary


def test_shapes_and_counts_of_a_small_convnet():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),   # 8 * (9 + 1) = 80
        nn.BatchNorm2d(8),                         # 2C = 16 (Keras: 4C = 32)
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 5),                 # 2048 * 5 + 5 = 10,245
    )
    s = summary(model, (1, 32, 32))
    assert s.table() == [("Input", "32x32x1", 0), ("Conv2d", "16x16x8", 80),
                         ("BatchNorm2d", "16x16x8", 16), ("LeakyReLU", "16x16x8", 0),
                         ("Flatten", "2048", 0), ("Linear", "5", 10_245)]
    assert s.total_params == sum(p.numel() for p in model.parameters())
    keras = summary(model, (1, 32, 32), keras_batchnorm=True, channels_last=False)
    assert keras.table()[2] == ("BatchNorm2d", "8x16x16", 32)
    assert "Total params: 10,357" in str(keras)
    assert model.training  # summary leaves the mode as it found it
