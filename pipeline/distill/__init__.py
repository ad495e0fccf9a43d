"""The distill stage: the training loop, its data path and sampler, the loss balancer and the losses."""
