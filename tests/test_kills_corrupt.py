"""corrupt/noise.py: additive noise keeps float32 and has the published standard deviation."""

import numpy as np

from cardkit.corrupt.noise import GAUSSIAN_STD, gaussian_noise


def test_gaussian_noise_is_float32_with_the_severity_std():
    images = np.full((4, 32, 32, 3), 0.5, dtype=np.float32)
    out = gaussian_noise(images, 5, np.random.default_rng(0))
    assert out.dtype == np.float32 and GAUSSIAN_STD[4] == 0.10
    # 12,288 draws: the sample std is within 3% of 0.10 (its relative standard error is 0.64%).
    assert abs(float((out - 0.5).std()) - 0.10) < 0.003 and abs(float((out - 0.5).mean())) < 0.003
