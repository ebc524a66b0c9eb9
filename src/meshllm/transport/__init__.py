"""Moving tensors between processes: the proto, its generated code, the tensor codec, the communicator."""
