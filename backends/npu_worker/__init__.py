"""The bounded OpenVINO GenAI worker (``orchgate npu-worker``): the engine behind the
``openvino`` backend, as ``llama-server`` is behind ``llamacpp``. Implements the NPU worker
contract (shared/seeds/npu-worker-contract.md) plus a bounded OpenAI chat route."""
