"""Export formats: ONNX (checked by onnxruntime), GGUF (checked by llama.cpp where installed), 4-bit bitsandbytes."""
