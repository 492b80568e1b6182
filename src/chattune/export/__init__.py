"""Exporting a trained run: its adapter merged into the base model (merge.py); a GGUF converted and quantised by
llama.cpp's own tools (llamacpp.py, gguf_build.py, gguf_meta.py, quants.py), an Ollama Modelfile (ollama.py), and the
check that llama.cpp answers like the trained model (parity.py)."""
