"""Using a trained student outside kdpipe: a transformers-loadable copy, ONNX encoders, a model card."""
