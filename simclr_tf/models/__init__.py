"""ResNet encoder, projection and supervised heads, the SimCLR model."""
