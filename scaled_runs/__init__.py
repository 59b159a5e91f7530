"""GPU training scripts (accelerate) that reuse dstar_edu's losses at CIFAR / PixArt / SDXL scale; see README.md."""
